//! [`Policy`]: everything the incident decider needs besides the state — taxonomy, routing
//! table and business calendar — loaded once at start-up and validated together.

use crate::calendar::{BusinessCalendar, CalendarError};
use crate::routing::{RoutingError, RoutingTable};
use crate::taxonomy::{DEFAULT_CATEGORIES_TOML, Taxonomy, TaxonomyError};

/// The city the services use when none is configured.
pub const DEFAULT_CITY: &str = "sanming";

/// Cities whose configuration is embedded in the binary.
pub const EMBEDDED_CITIES: &[&str] = &["sanming", "yixing", "wuhan", "hangzhou", "loudi"];

/// Which of a city's files.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CityFile {
    Routing,
    Calendar,
}

/// The embedded text of one of a city's files, if the city is embedded.
pub fn city_file(city: &str, file: CityFile) -> Option<&'static str> {
    Some(match (city, file) {
        ("sanming", CityFile::Routing) => {
            include_str!("../../../config/cities/sanming/routing.toml")
        }
        ("sanming", CityFile::Calendar) => {
            include_str!("../../../config/cities/sanming/calendar.toml")
        }
        ("yixing", CityFile::Routing) => include_str!("../../../config/cities/yixing/routing.toml"),
        ("yixing", CityFile::Calendar) => {
            include_str!("../../../config/cities/yixing/calendar.toml")
        }
        ("wuhan", CityFile::Routing) => {
            include_str!("../../../config/cities/wuhan/routing.toml")
        }
        ("wuhan", CityFile::Calendar) => {
            include_str!("../../../config/cities/wuhan/calendar.toml")
        }
        ("hangzhou", CityFile::Routing) => {
            include_str!("../../../config/cities/hangzhou/routing.toml")
        }
        ("hangzhou", CityFile::Calendar) => {
            include_str!("../../../config/cities/hangzhou/calendar.toml")
        }
        ("loudi", CityFile::Routing) => {
            include_str!("../../../config/cities/loudi/routing.toml")
        }
        ("loudi", CityFile::Calendar) => {
            include_str!("../../../config/cities/loudi/calendar.toml")
        }
        _ => return None,
    })
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("no embedded configuration for city {0:?} (embedded: {EMBEDDED_CITIES:?})")]
    UnknownCity(String),
    #[error("taxonomy: {0}")]
    Taxonomy(#[from] TaxonomyError),
    #[error("routing table: {0}")]
    Routing(#[from] RoutingError),
    #[error("calendar: {0}")]
    Calendar(#[from] CalendarError),
}

/// Taxonomy + routing + calendar for one city.
#[derive(Clone, Debug)]
pub struct Policy {
    pub taxonomy: Taxonomy,
    pub routing: RoutingTable,
    pub calendar: BusinessCalendar,
}

impl Policy {
    /// Builds a policy from file texts the caller read (override files), validating all three.
    pub fn parse(
        categories_toml: &str,
        routing_toml: &str,
        calendar_toml: &str,
    ) -> Result<Policy, PolicyError> {
        let taxonomy = Taxonomy::parse(categories_toml)?;
        let routing = RoutingTable::parse(routing_toml, &taxonomy)?;
        let calendar = BusinessCalendar::parse(calendar_toml)?;
        Ok(Policy {
            taxonomy,
            routing,
            calendar,
        })
    }

    /// The embedded configuration of `city`.
    pub fn embedded(city: &str) -> Result<Policy, PolicyError> {
        Policy::embedded_with(city, None, None, None)
    }

    /// The embedded configuration of `city` with some of its files replaced by texts the
    /// caller read (a city's own calendar for next year, its routing table): each `None`
    /// keeps the embedded file.
    pub fn embedded_with(
        city: &str,
        categories_toml: Option<&str>,
        routing_toml: Option<&str>,
        calendar_toml: Option<&str>,
    ) -> Result<Policy, PolicyError> {
        let unknown = || PolicyError::UnknownCity(city.to_owned());
        let routing = match routing_toml {
            Some(text) => text,
            None => city_file(city, CityFile::Routing).ok_or_else(unknown)?,
        };
        let calendar = match calendar_toml {
            Some(text) => text,
            None => city_file(city, CityFile::Calendar).ok_or_else(unknown)?,
        };
        Policy::parse(
            categories_toml.unwrap_or(DEFAULT_CATEGORIES_TOML),
            routing,
            calendar,
        )
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    #[test]
    fn every_embedded_city_loads() {
        for city in EMBEDDED_CITIES {
            let policy = Policy::embedded(city).unwrap_or_else(|e| panic!("{city}: {e}"));
            assert_eq!(policy.routing.city, *city);
        }
        assert!(matches!(
            Policy::embedded("atlantis"),
            Err(PolicyError::UnknownCity(_))
        ));
    }

    fn check_routing(edit: impl Fn(&str) -> String, expect: Expect) {
        let routing = edit(city_file("sanming", CityFile::Routing).unwrap_or_default());
        let calendar = city_file("sanming", CityFile::Calendar).unwrap_or_default();
        let actual = match Policy::parse(DEFAULT_CATEGORIES_TOML, &routing, calendar) {
            Ok(p) => format!("ok: {} departments", p.routing.departments().count()),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn routing_validation() {
        check_routing(|s| s.to_owned(), expect!["ok: 15 departments"]);
        check_routing(
            |s| s.replacen("department = \"yuanlin\"", "department = \"nobody\"", 1),
            expect![[
                r#"error: routing table: route for category 0106 names unknown department "nobody""#
            ]],
        );
        check_routing(
            |s| s.replacen("category = \"30\"", "category = \"2801\"", 1),
            expect![
                "error: routing table: route for category 2801 names a category the taxonomy does not define"
            ],
        );
        check_routing(
            |s| s.replacen("category = \"30\"", "category = \"29\"", 1),
            expect![
                "error: routing table: category 29 is routed twice (for the same street, if an override)"
            ],
        );
        check_routing(
            |s| {
                let i = s.find("[[route]]\ncategory = \"30\"").unwrap_or(s.len());
                let j = s[i..].find("\n\n").map_or(s.len(), |j| i + j);
                format!("{}{}", &s[..i], &s[j..])
            },
            expect![
                "error: routing table: category 30 has no route (neither its own nor its class's)"
            ],
        );
        check_routing(
            |s| s.replacen("response_minutes = 60", "response_minutes = 0", 1),
            expect![
                "error: routing table: route for category 01: response_minutes must be between 1 and 527040 minutes, got 0"
            ],
        );
        check_routing(
            |s| s.replacen("report_limit_minutes = 30", "report_limit_minutes = 0", 1),
            expect![
                "error: routing table: whistle Tough: report limit must be between 1 and 527040 minutes, got 0"
            ],
        );
        check_routing(
            |s| s.replacen("id = \"sifa\"", "id = \"zhujian\"", 1),
            expect!["error: routing table: department zhujian is defined twice"],
        );
    }
}
