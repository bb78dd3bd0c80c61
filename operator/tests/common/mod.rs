//! Helpers shared by the operator's integration tests; each test uses some of them.
#![allow(dead_code)]

pub mod fake_api;
pub mod http;
pub mod tools;
