//! Test support for the end-to-end suites in tests/tests/.
