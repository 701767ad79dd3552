//! Criterion benchmarks of the DMSC hot path live in `benches/benches/`; this library is
//! empty. Run them with `cargo bench -p dmsc-benches`.
