//! The I/O shell of one data-plane worker: a thread with its own UDP sockets, `mio::Poll`,
//! inbox and clock, around the sans-IO [`Core`] that decides everything.
//!
//! The shell follows the core's calling contract (see [`crate::core`]): each iteration it waits
//! for a socket, the waker or the core's next timeout; feeds received datagrams (at most
//! [`RECV_BUDGET`] per socket), inbox messages (at most [`INBOX_BUDGET`]) and due timers to the
//! core; sends what `poll_transmit` yields and delivers what `poll_message` yields to the other
//! workers' inboxes; and ends the iteration. When it stopped short of a budget it polls again
//! without sleeping.

use std::io::IoSliceMut;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_udp::{RecvMeta, UdpSocketState};
use tracing::{debug, debug_span, warn};

use crate::core::{Core, Transmit, INBOX_BUDGET, RECV_BUDGET};
use crate::msg::WorkerMsg;
use crate::routing::WorkerId;
use crate::stats::WorkerStats;

const WAKER: Token = Token(usize::MAX);
/// Datagrams received per `recvmmsg` call.
const BATCH: usize = 16;
/// How soon to retry delivering to a worker whose inbox was full.
const RETRY_FULL_INBOX: std::time::Duration = std::time::Duration::from_millis(1);

/// The channels between workers: each worker's inbox sender and the waker of its poll.
#[derive(Debug)]
pub(crate) struct Mailboxes {
    pub(crate) senders: Vec<Sender<WorkerMsg>>,
    pub(crate) wakers: Vec<Arc<Waker>>,
}

impl Mailboxes {
    /// Sends `msg` to worker `to` from outside the workers (blocking while its inbox is full;
    /// a worker that has stopped takes nothing, which is fine for what is sent this way).
    pub(crate) fn send_blocking(&self, to: usize, msg: WorkerMsg) {
        if self.senders[to].send(msg).is_ok() {
            let _ = self.wakers[to].wake();
        }
    }
}

/// A bound UDP socket with its quinn-udp state.
pub(crate) struct Socket {
    pub(crate) io: UdpSocket,
    pub(crate) state: UdpSocketState,
    /// A transmit that met a full send buffer, retried when the socket is writable.
    blocked: Option<Blocked>,
    /// The last receive stopped at the budget: the socket may hold more.
    readable: bool,
}

/// A transmit kept for a socket that reported "would block".
struct Blocked {
    transmit: Transmit,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("io", &self.io).finish()
    }
}

impl Socket {
    pub(crate) fn new(io: UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&io).into())?;
        Ok(Self {
            io,
            state,
            blocked: None,
            readable: false,
        })
    }
}

/// One worker thread: the shell and its core.
pub(crate) struct Worker {
    core: Core,
    stats: Arc<WorkerStats>,
    poll: Poll,
    sockets: Vec<Socket>,
    inbox: Receiver<WorkerMsg>,
    mailboxes: Arc<Mailboxes>,
    recv_bufs: Vec<Vec<u8>>,
    /// Receive batches are copied into this, one allocation per batch rather than per datagram.
    recv_copy: BytesMut,
    send_buf: Vec<u8>,
    /// Which workers were sent a message in this iteration (to wake each once).
    woken: Vec<bool>,
    /// Datagrams fed to the core per socket per iteration.
    recv_budget: usize,
    /// How long to keep polling without sleeping before the worker would block
    /// (`busy_poll_us`); zero: block at once.
    busy_poll: std::time::Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("core", &self.core).finish()
    }
}

impl Worker {
    pub(crate) fn new(
        core: Core,
        stats: Arc<WorkerStats>,
        poll: Poll,
        sockets: Vec<Socket>,
        inbox: Receiver<WorkerMsg>,
        mailboxes: Arc<Mailboxes>,
        busy_poll: std::time::Duration,
    ) -> Self {
        let gro = sockets
            .iter()
            .map(|s| s.state.gro_segments())
            .max()
            .unwrap_or(1);
        let buf_len = (1500 * gro).clamp(1500, 65_535);
        let workers = mailboxes.senders.len();
        Self {
            core,
            stats,
            poll,
            sockets,
            inbox,
            mailboxes,
            recv_bufs: (0..BATCH).map(|_| vec![0; buf_len]).collect(),
            recv_copy: BytesMut::new(),
            send_buf: Vec::with_capacity(65_536),
            woken: vec![false; workers],
            recv_budget: RECV_BUDGET,
            busy_poll,
        }
    }

    /// Runs the event loop until the worker has drained and closed every connection.
    pub(crate) fn run(mut self) {
        let _span = debug_span!("worker", index = self.core.index().0).entered();
        let mut events = Events::with_capacity(256);
        for (i, s) in self.sockets.iter_mut().enumerate() {
            if let Err(e) = self.poll.registry().register(
                &mut s.io,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!(error = %e, "cannot register socket");
                return;
            }
        }
        let mut inbox_left = false;
        let mut peer_full = false;
        loop {
            let now = Instant::now();
            let busy = inbox_left || self.sockets.iter().any(|s| s.readable);
            let mut timeout = if busy {
                Some(std::time::Duration::ZERO)
            } else {
                self.core
                    .poll_timeout()
                    .map(|at| at.saturating_duration_since(now))
            };
            if peer_full {
                // Messages wait for a worker whose inbox is full: try again shortly, without
                // spinning (spinning would take the very core that worker may need).
                timeout = Some(timeout.map_or(RETRY_FULL_INBOX, |t| t.min(RETRY_FULL_INBOX)));
            }
            WorkerStats::add(&self.stats.wakeups, 1);
            if !self.busy_poll.is_zero() && timeout != Some(std::time::Duration::ZERO) {
                // Busy polling: look for work without sleeping for a while before blocking,
                // trading CPU for the kernel's wake-up latency.
                let started = Instant::now();
                let deadline = timeout.map(|t| started + t);
                let spin_until = deadline.map_or(started + self.busy_poll, |d| {
                    d.min(started + self.busy_poll)
                });
                let mut now = started;
                events.clear();
                while events.is_empty() && now < spin_until {
                    if let Err(e) = self.poll.poll(&mut events, Some(std::time::Duration::ZERO)) {
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            warn!(error = %e, "poll failed");
                            return;
                        }
                    }
                    // Yield rather than spin: a thread of another process (an agent, a caller)
                    // that shares this core runs at once instead of waiting for the poll to
                    // end; with the core to itself, the worker is back at once.
                    std::thread::yield_now();
                    now = Instant::now();
                }
                if events.is_empty() {
                    let left = deadline.map(|d| d.saturating_duration_since(now));
                    if let Err(e) = self.poll.poll(&mut events, left) {
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            warn!(error = %e, "poll failed");
                            return;
                        }
                    }
                }
            } else if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!(error = %e, "poll failed");
                    return;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                let Token(i) = ev.token();
                if ev.token() == WAKER {
                    continue;
                }
                if ev.is_writable() {
                    self.flush_blocked(i);
                }
                if ev.is_readable() {
                    self.sockets[i].readable = true;
                }
            }
            for i in 0..self.sockets.len() {
                if self.sockets[i].readable {
                    self.receive(i, now);
                }
            }
            inbox_left = self.drain_inbox(now);
            self.core.handle_timeout(now);
            self.transmit(now);
            peer_full = self.deliver();
            if self.core.end_iteration(Instant::now()) {
                return;
            }
        }
    }

    /// Feeds up to [`RECV_BUDGET`] datagrams of socket `i` to the core.
    fn receive(&mut self, i: usize, now: Instant) {
        let mut metas = [RecvMeta::default(); BATCH];
        let mut fed = 0;
        while fed < self.recv_budget {
            let s = &self.sockets[i];
            // A fixed array, not a Vec: no allocation per receive batch. `recv_bufs` holds
            // exactly BATCH buffers (built so in `Worker::new`).
            let mut slots = self.recv_bufs.iter_mut();
            let mut bufs: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(slots.next().expect("BATCH receive buffers"))
            });
            let n = match s.state.recv((&s.io).into(), &mut bufs, &mut metas) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.sockets[i].readable = false;
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "recv failed");
                    self.sockets[i].readable = false;
                    return;
                }
            };
            let total: usize = metas[..n].iter().map(|m| m.len).sum();
            self.recv_copy.reserve(total);
            for (meta, buf) in metas.iter().zip(self.recv_bufs.iter()).take(n) {
                self.recv_copy.extend_from_slice(&buf[..meta.len]);
                let mut data = self.recv_copy.split();
                while !data.is_empty() {
                    let stride = meta.stride.min(data.len()).max(1);
                    let datagram = data.split_to(stride);
                    self.core.handle_datagram(
                        now,
                        i,
                        meta.addr,
                        meta.dst_ip,
                        meta.ecn.map(ecn_in),
                        datagram,
                    );
                    fed += 1;
                }
            }
            WorkerStats::add(&self.stats.datagrams_received, n as u64);
        }
        // Budget reached: the socket may hold more; the loop polls again without sleeping.
    }

    /// Feeds up to [`INBOX_BUDGET`] inbox messages to the core; true if some were left.
    fn drain_inbox(&mut self, now: Instant) -> bool {
        for _ in 0..INBOX_BUDGET {
            let Ok(msg) = self.inbox.try_recv() else {
                return false;
            };
            self.core.handle_message(now, msg);
        }
        !self.inbox.is_empty()
    }

    fn transmit(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.send_buf);
        loop {
            let sockets = &self.sockets;
            let Some(t) = self
                .core
                .poll_transmit(now, &mut buf, |s| sockets[s].blocked.is_none())
            else {
                break;
            };
            self.send(&t, &buf);
        }
        self.send_buf = buf;
    }

    fn send(&mut self, t: &Transmit, buf: &[u8]) {
        let s = &mut self.sockets[t.socket];
        if s.blocked.is_some() {
            WorkerStats::add(&self.stats.send_drops, 1);
            return;
        }
        let transmit = udp_transmit(t, &buf[..t.size]);
        match s.state.try_send((&s.io).into(), &transmit) {
            Ok(()) => WorkerStats::add(&self.stats.datagrams_sent, 1),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.blocked = Some(Blocked {
                    transmit: *t,
                    bytes: buf[..t.size].to_vec(),
                });
            }
            Err(e) => debug!(error = %e, "send failed"),
        }
    }

    fn flush_blocked(&mut self, i: usize) {
        let s = &mut self.sockets[i];
        let Some(blocked) = s.blocked.take() else {
            return;
        };
        let transmit = udp_transmit(&blocked.transmit, &blocked.bytes);
        match s.state.try_send((&s.io).into(), &transmit) {
            Ok(()) => self.core.handle_writable(i),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.blocked = Some(blocked),
            Err(e) => {
                debug!(error = %e, "send failed");
                self.core.handle_writable(i);
            }
        }
    }

    /// Hands the core's messages to the other workers' inboxes, waking each once; true if some
    /// are left because a destination's inbox is full.
    fn deliver(&mut self) -> bool {
        if !self.core.has_messages() {
            return false;
        }
        let mut full = false;
        for to in WorkerId::all(self.mailboxes.senders.len()) {
            while let Some(msg) = self.core.poll_message(to) {
                match self.mailboxes.senders[to.index()].try_send(msg) {
                    Ok(()) => self.woken[to.index()] = true,
                    Err(TrySendError::Full(msg)) => {
                        self.core.requeue_message(to, msg);
                        full = true;
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
        }
        for (to, woken) in self.woken.iter_mut().enumerate() {
            if std::mem::take(woken) {
                let _ = self.mailboxes.wakers[to].wake();
            }
        }
        full
    }
}

fn udp_transmit<'a>(t: &Transmit, contents: &'a [u8]) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: t.destination,
        ecn: t.ecn.map(ecn_out),
        contents,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

fn ecn_in(e: quinn_udp::EcnCodepoint) -> quinn_proto::EcnCodepoint {
    match e {
        quinn_udp::EcnCodepoint::Ect0 => quinn_proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => quinn_proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => quinn_proto::EcnCodepoint::Ce,
    }
}

fn ecn_out(e: quinn_proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match e {
        quinn_proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        quinn_proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        quinn_proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    /// Defect 6: under a flood, one iteration reads at most the budget from a socket and the
    /// loop comes back for the rest without waiting for a new readiness event.
    #[test]
    fn receive_stops_at_its_budget_and_the_socket_stays_marked_readable() {
        let (core, stats) = crate::core::tests::single_core();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let addr = std_socket.local_addr().unwrap();
        let socket = Socket::new(UdpSocket::from_std(std_socket)).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).unwrap());
        let mailboxes = Arc::new(Mailboxes {
            senders: vec![tx],
            wakers: vec![waker],
        });
        let mut worker = Worker::new(
            core,
            stats.clone(),
            poll,
            vec![socket],
            rx,
            mailboxes,
            std::time::Duration::ZERO,
        );
        worker.recv_budget = 32;
        let flood = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..100 {
            flood.send_to(&[0u8; 8], addr).unwrap();
        }
        worker.sockets[0].readable = true;
        let now = Instant::now();
        worker.receive(0, now);
        let first = stats.datagrams_received.load(Relaxed);
        assert!(
            (32..32 + BATCH as u64).contains(&first),
            "{first} read in one go"
        );
        assert!(worker.sockets[0].readable, "more is waiting");
        for _ in 0..10 {
            if !worker.sockets[0].readable {
                break;
            }
            worker.receive(0, now);
        }
        assert_eq!(stats.datagrams_received.load(Relaxed), 100);
        assert!(!worker.sockets[0].readable);
    }
}
