//! intake: not written yet.
#![forbid(unsafe_code)]
