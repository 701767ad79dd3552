//! Decoders never allocate beyond what their limits allow, whatever bytes arrive.
//!
//! A counting global allocator records the largest single allocation and the total allocated
//! while a decoder runs on arbitrary input.

// The allocator below is the only unsafe code in this test crate: it forwards to the system
// allocator and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;

use dmsc_protocol::control::ControlFrame;
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::limits::MAX_HEADER_BYTES;

thread_local! {
    static TOTAL: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counters are thread-local cells
// that never allocate themselves.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TOTAL.try_with(|t| t.set(t.get() + layout.size()));
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: same layout as given to us.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns (total bytes allocated, largest single allocation).
fn measure(f: impl FnOnce()) -> (usize, usize) {
    TOTAL.with(|t| t.set(0));
    LARGEST.with(|l| l.set(0));
    f();
    (TOTAL.with(Cell::get), LARGEST.with(Cell::get))
}

proptest! {
    #[test]
    fn header_decoding_allocates_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (total, _) = measure(|| {
            let _ = std::hint::black_box(RequestHeader::decode(&bytes, MAX_HEADER_BYTES));
            let _ = std::hint::black_box(ResponseHeader::decode(&bytes, MAX_HEADER_BYTES));
        });
        prop_assert_eq!(total, 0);
    }

    #[test]
    fn control_decoding_allocates_at_most_what_arrived(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        limit in 0usize..8192,
    ) {
        let (total, largest) = measure(|| {
            let _ = std::hint::black_box(ControlFrame::decode(&bytes, limit));
        });
        // Strings and cards are copies of parts of the input and vectors grow with the items
        // that actually arrived (each takes at least one input byte), so what is allocated is
        // proportional to the input, never to a length or count the peer merely announces.
        let bound = 64 * bytes.len() + 2048;
        prop_assert!(total <= bound, "allocated {} for {} input bytes", total, bytes.len());
        prop_assert!(largest <= 16 * bytes.len() + 2048, "largest {}", largest);
    }
}

#[test]
fn an_announced_count_is_not_preallocated() {
    // ATTACH_OK announcing 256 lanes, then ending: the decoder must fail without reserving
    // room for 256 addresses.
    let mut payload = vec![0u8; 8 + 16];
    payload.push(0x00); // worker
    payload.extend_from_slice(&[0x41, 0x00]); // 256 lanes follow (none do)
    let mut frame = vec![0x02, payload.len() as u8];
    frame.extend_from_slice(&payload);
    let (_, largest) = measure(|| {
        assert!(ControlFrame::decode(&frame, 1024).is_err());
    });
    assert!(
        largest <= 16 * std::mem::size_of::<String>(),
        "largest allocation {largest}"
    );
}
