//! mars-api
