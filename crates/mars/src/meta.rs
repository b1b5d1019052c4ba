//! The metadata keys marsd uses: see [`mars_meta::schema`].

pub use mars_meta::schema::*;
