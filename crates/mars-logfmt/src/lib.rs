//! mars-logfmt
