//! The vocabulary every layer shares: chat messages, requests and their outcomes.

pub(crate) mod generation;
pub(crate) mod message;
pub(crate) mod reply;
pub(crate) mod request;
pub(crate) mod tools;
