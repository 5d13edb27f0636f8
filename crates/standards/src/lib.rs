//! Community standards: what each seed city's policy document requires of a community.
//!
//! Why a crate of its own: the figures (grids per household, staff bands, space, funds,
//! volunteers) differ from city to city and change by decree, so they live as data in
//! `config/standards/<city>.toml`, each rule quoting the clause it comes from. This crate loads
//! and validates those profiles and checks one community's known facts against one profile with
//! a pure function, [`evaluate`], whose [`ComplianceReport`] is serialisable so the registry can
//! serve it over NATS and auditors can trace every verdict back to its document and sentence.
//!
//! An unknown fact is never a pass or a fail: it yields [`Status::Unknown`].
#![forbid(unsafe_code)]

mod evaluate;
mod facts;
mod profile;

pub use evaluate::{
    Bounds, Citation, ComplianceReport, Finding, Required, Status, Summary, evaluate,
};
pub use facts::{CommunityFacts, DistrictKind, FactsError, HOUSEHOLDS_MAX, POPULATION_MAX};
pub use profile::{
    Applies, Band, Basis, CITIES, Document, Measure, PROFILE_MAX_BYTES, Period, Profile,
    ProfileError, Requirement, Rounding, Rule, builtin, builtin_all,
};
