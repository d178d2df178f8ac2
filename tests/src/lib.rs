//! End-to-end tests of the lambda workspace live in `tests/tests/`; this library is empty.
