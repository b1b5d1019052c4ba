//! mars-logger
