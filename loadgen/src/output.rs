//! Histogram files: the percentile distribution (`.hgrm`) and the interval log (`.hlog`).
//!
//! `.hgrm` is the text HdrHistogram's `outputPercentileDistribution` prints (and wrk2 with
//! `--latency`), with values in µs: it loads into the HdrHistogram plotter
//! (<https://hdrhistogram.github.io/HdrHistogram/plotFiles.html>). `.hlog` is the interval log
//! of HdrHistogram's `HistogramLogWriter` (format 1.3): one V2-compressed histogram per second,
//! readable by `HistogramLogProcessor` and the hdrhistogram crates.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use crate::report::Interval;

/// Percentile ticks per half distance, as in `outputPercentileDistribution`'s default.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The percentile distribution of `h` in HdrHistogram's text format (values as recorded: µs).
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.digits$} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:12.digits$} {q:2.12} {total:10}");
        }
    }
    let (mean, stdev) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean(), h.stdev())
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.digits$}, Total count    = {:12}]",
        h.max() as f64,
        h.len()
    );
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {sub_buckets:12}]",
        h.buckets()
    );
    out
}

/// An interval log of `intervals` (in time order), with `comment` as its first line.
pub fn interval_log(intervals: &[Interval], comment: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let base = intervals.first().map_or_else(SystemTime::now, |i| i.start);
    let base_seconds = seconds_since_epoch(base);
    // The header is written by hand: the crate's builder would put the legend line (which
    // Java's reader expects before the first interval) nowhere.
    let mut header = String::new();
    for line in comment.lines() {
        let _ = writeln!(header, "#{line}");
    }
    let _ = writeln!(header, "#[Histogram log format version 1.3]");
    let _ = writeln!(
        header,
        "#[StartTime: {base_seconds:.3} (seconds since epoch)]"
    );
    let _ = writeln!(
        header,
        "#[BaseTime: {base_seconds:.3} (seconds since epoch)]"
    );
    let _ = writeln!(
        header,
        "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
    );
    out.extend_from_slice(header.as_bytes());
    let mut serializer = V2DeflateSerializer::new();
    let mut writer = IntervalLogWriterBuilder::new().begin_log_with(&mut out, &mut serializer)?;
    for interval in intervals {
        let offset = interval.start.duration_since(base).unwrap_or_default();
        writer
            .write_histogram(&interval.histogram, offset, interval.length, None)
            .map_err(|e| anyhow!("writing the interval log: {e}"))?;
    }
    Ok(out)
}

fn seconds_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    use super::*;
    use crate::caller::new_histogram;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_has_the_hdrhistogram_layout() {
        let text = percentile_distribution(&sample());
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("       Value     Percentile TotalCount 1/(1-Percentile)")
        );
        assert_eq!(lines.next(), Some(""));
        let first = lines.next().unwrap();
        assert_eq!(
            first,
            "      10.000 0.000000000000          1           1.00"
        );
        // The median line, and the last line: percentile 1, the total, no inverse column.
        assert!(
            text.contains("    5003.000 0.500000000000        500           2.00"),
            "{text}"
        );
        let last = text.lines().rfind(|l| !l.starts_with('#')).unwrap();
        assert_eq!(last, "   10007.000 1.000000000000       1000");
        assert!(text.contains("#[Mean    =     5005.799, StdDeviation   =     2887.034]"));
        assert!(text.contains("#[Max     =    10007.000, Total count    =         1000]"));
        assert!(text.contains("#[Buckets =           16, SubBuckets     =         2048]"));
        // Every data line parses as four (or, last, three) numbers.
        for line in text.lines().skip(2).filter(|l| !l.starts_with('#')) {
            let fields: Vec<f64> = line
                .split_whitespace()
                .map(|f| f.parse().unwrap())
                .collect();
            assert!(fields.len() == 4 || fields.len() == 3, "{line}");
        }
    }

    #[test]
    fn an_empty_histogram_still_has_the_footer() {
        let text = percentile_distribution(&new_histogram());
        assert!(text.contains("Total count    =            0]"), "{text}");
    }

    #[test]
    fn the_interval_log_reads_back() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let intervals: Vec<Interval> = (0..3)
            .map(|k| Interval {
                start: start + Duration::from_secs(k),
                length: Duration::from_secs(1),
                histogram: sample(),
            })
            .collect();
        let log = interval_log(&intervals, "a comment").unwrap();
        let text = String::from_utf8(log.clone()).unwrap();
        assert!(text.starts_with("#a comment\n#[Histogram log format version 1.3]\n"));
        assert!(text.contains("#[StartTime: 1700000000.000 (seconds since epoch)]"));
        assert!(text.contains(
            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
        ));
        let mut seen = 0;
        for entry in IntervalLogIterator::new(&log) {
            if let LogEntry::Interval(interval) = entry.unwrap() {
                assert_eq!(interval.start_timestamp(), Duration::from_secs(seen));
                assert_eq!(interval.duration(), Duration::from_secs(1));
                let bytes = base64_decode(interval.encoded_histogram());
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .unwrap();
                assert_eq!(h.len(), 1000);
                assert_eq!(h.max(), sample().max());
                seen += 1;
            }
        }
        assert_eq!(seen, 3);
    }

    /// Standard base64, for the test only (the crate's dependency is not ours to call).
    fn base64_decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for c in text.bytes().filter(|&c| c != b'=') {
            acc = (acc << 6) | u32::from(value(c));
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
