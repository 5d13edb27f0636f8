//! registry: the grid registry (网格登记) of wangge.
//!
//! Why it exists: every incident must land in a grid with a named grid worker (网格员), and
//! every grid must come from an auditable decision. The registry keeps communities, their
//! buildings, their grids and their workers as an event-sourced aggregate per community on the
//! GRIDS stream, and answers "which grid serves this point?" from memory in microseconds.
//!
//! - [`domain`]: the pure community aggregate (`decide` / `evolve`, typed [`domain::Rejection`]s).
//! - [`wire`]: frozen, versioned postcard encodings of its events ([`RegistryCodec`]).
//! - [`api`]: the JSON messages of `grids.locate`, `grids.cmd.<command>`, `grids.query.community`.
//! - [`directory`]: the in-memory state of all communities and the locate index behind
//!   [`Locator`], the cheap in-process handle other services (intake) call.
//! - [`service`]: the NATS shell ([`RegistryService`]).
#![forbid(unsafe_code)]

pub mod api;
pub mod directory;
pub mod domain;
pub mod service;
pub mod wire;

pub use api::LocateAnswer;
pub use directory::{BuildingAnswer, Locator};
pub use service::{RegistryService, ServiceConfig, ServiceError};
pub use wire::RegistryCodec;
