//! hamok's own test support (not published): the seeded simulation of whole peers ([`sim`]).
#![forbid(unsafe_code)]

pub mod sim;
