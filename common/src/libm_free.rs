//! `pow(3)`, defined here so that no binary linking this crate loads glibc's libm.
//!
//! The daemons' only use of libm is one `powf` in tokio's multi-threaded scheduler (a
//! moving average of task poll times). For that one function the dynamic loader
//! mapped libm.so and ran its IFUNC resolvers (dozens of them, one per vectorised math
//! routine, scattered over its text), and every page fault there maps 16 pages around
//! it: 0.4–0.6 MiB of each daemon's resident memory (an idle virtlogd 4.2 -> 3.6 MiB,
//! virtlockd 3.9 -> 3.5 MiB), and one more library to load on every start and
//! re-exec. With `pow` defined in the executable the linker (which Rust runs with
//! `--as-needed`) leaves libm out.
//!
//! The implementation is the `libm` crate's (rust-lang's port of musl's), accurate to
//! within an ulp, as glibc's is; tokio only needs a smooth average.

/// The C library's `pow`: `x` raised to the power `y`.
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pow_is_the_c_librarys() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(0.9, 0.0), 1.0);
        assert!((super::pow(0.8, 3.5) - 0.457_946_721_791_957).abs() < 1e-15);
        assert!(super::pow(-1.0, 0.5).is_nan());
    }
}
