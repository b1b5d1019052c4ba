//! mars-nbd
