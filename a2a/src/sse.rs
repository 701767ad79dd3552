//! Reading server-sent events (the WHATWG `text/event-stream` format) from an upstream agent:
//! lines end with LF, CR LF or CR; `data:` lines of one event are joined with LF; a blank line
//! ends the event; comments (`:`) and other fields are ignored. Every event is bounded.

use crate::error::{A2aError, ErrorKind};

/// An incremental `text/event-stream` parser yielding each event's data.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    after_cr: bool,
    limit: usize,
}

impl SseParser {
    /// A parser refusing events (or lines) longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            limit,
        }
    }

    /// Feeds a chunk; pushes the data of every event it completes onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), A2aError> {
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue; // CR LF is one line end
                }
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => {
                    self.line.push(b);
                    if self.line.len() + self.data.len() > self.limit {
                        return Err(A2aError::new(
                            ErrorKind::InvalidAgentResponse,
                            format!(
                                "an event from the agent is over the limit of {} bytes",
                                self.limit
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<Vec<u8>>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.data));
                self.has_data = false;
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[&[u8]]) -> Vec<String> {
        let mut parser = SseParser::new(64);
        let mut out = Vec::new();
        for chunk in input {
            parser.push(chunk, &mut out).unwrap();
        }
        out.into_iter()
            .map(|d| String::from_utf8(d).unwrap())
            .collect()
    }

    #[test]
    fn events_across_chunks_and_line_ends() {
        assert_eq!(
            events(&[
                b"data: {\"a\"",
                b":1}\n\n: ping\n\nevent: x\r\ndata:b\r\ndata: c\r\n\r\n"
            ]),
            vec!["{\"a\":1}", "b\nc"]
        );
        assert_eq!(events(&[b"data: x\r", b"\ndata: y\r\r"]), vec!["x\ny"]);
        assert!(events(&[b"data: unfinished"]).is_empty());
    }

    #[test]
    fn bounded() {
        let mut parser = SseParser::new(8);
        let mut out = Vec::new();
        assert!(parser.push(b"data: 0123456789", &mut out).is_err());
    }
}
