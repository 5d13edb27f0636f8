//! A city's routing table (`config/cities/<city>/routing.toml`): its departments, where each
//! category goes and how long the handler has, per-street overrides, and how long a summoned
//! department has to report (报到) to a whistle.
//!
//! Everything is checked at load, against the taxonomy, so a bad table stops a service at
//! start-up with a typed error instead of misrouting a case at 3 a.m.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::calendar::Clock;
use crate::ids::{CategoryCode, DepartmentId, StreetCode};
use crate::taxonomy::{HandlingLevel, Taxonomy};

/// Most departments one table may define.
pub const DEPARTMENTS_MAX: usize = 500;
/// Most routes (category and street overrides together) one table may define.
pub const ROUTES_MAX: usize = 20_000;
/// Most departments one whistle may summon.
pub const SUMMONS_MAX: usize = 8;
/// Most fallback departments a route may list.
pub const FALLBACKS_MAX: usize = 4;
/// Longest limit a route or whistle may set: one year of minutes.
pub const LIMIT_MINUTES_MAX: u32 = 366 * 24 * 60;

/// The three whistle kinds of the Beijing/Sanming mechanism.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhistleKind {
    /// 日常哨: a routine case is stuck or late.
    Routine,
    /// 攻坚哨: a hard case beyond the handler's powers, or one that stayed stuck after a whistle.
    Tough,
    /// 应急哨: an emergency.
    Emergency,
}

impl WhistleKind {
    pub const ALL: [WhistleKind; 3] = [
        WhistleKind::Routine,
        WhistleKind::Tough,
        WhistleKind::Emergency,
    ];

    /// Its name in JSON and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            WhistleKind::Routine => "routine",
            WhistleKind::Tough => "tough",
            WhistleKind::Emergency => "emergency",
        }
    }
}

/// How long a summoned department has to report.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportLimit {
    pub report_limit_minutes: u32,
    pub clock: Clock,
}

/// Report limits per whistle kind.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhistleLimits {
    pub routine: ReportLimit,
    pub tough: ReportLimit,
    pub emergency: ReportLimit,
}

impl WhistleLimits {
    pub fn for_kind(&self, kind: WhistleKind) -> ReportLimit {
        match kind {
            WhistleKind::Routine => self.routine,
            WhistleKind::Tough => self.tough,
            WhistleKind::Emergency => self.emergency,
        }
    }
}

/// One department.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Department {
    pub id: DepartmentId,
    pub name_zh: String,
    pub name_en: String,
}

/// Where a category goes and its limits, fully resolved.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Route {
    pub level: HandlingLevel,
    /// The responsible department: the handler when `level` is `Department`, and the first
    /// department a whistle summons in every case.
    pub department: DepartmentId,
    pub response_minutes: u32,
    pub resolution_minutes: u32,
    /// `Wall` for emergency categories, `Working` otherwise.
    pub clock: Clock,
    /// Departments a whistle on this category summons (the responsible department first).
    pub summon: Vec<DepartmentId>,
    /// Where a "not ours" return goes next, in order; empty means back to the street.
    pub fallback: Vec<DepartmentId>,
}

/// Why a routing table was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("routing file is not valid TOML for the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("department id {id:?} is invalid: {source}")]
    BadDepartmentId {
        id: String,
        source: crate::ids::CodeError,
    },
    #[error("department {0} is defined twice")]
    DuplicateDepartment(DepartmentId),
    #[error("{count} departments, more than DEPARTMENTS_MAX = {DEPARTMENTS_MAX}")]
    TooManyDepartments { count: usize },
    #[error("{count} routes, more than ROUTES_MAX = {ROUTES_MAX}")]
    TooManyRoutes { count: usize },
    #[error("route for {category:?}: {source}")]
    BadCategory {
        category: String,
        source: crate::ids::CodeError,
    },
    #[error("street override {street:?}: {source}")]
    BadStreet {
        street: String,
        source: crate::ids::CodeError,
    },
    #[error("route for category {0} names a category the taxonomy does not define")]
    UnknownCategory(CategoryCode),
    #[error("route for category {category} names unknown department {department:?}")]
    UnknownDepartment {
        category: CategoryCode,
        department: String,
    },
    #[error("category {0} is routed twice (for the same street, if an override)")]
    DuplicateRoute(CategoryCode),
    #[error("category {0} has no route (neither its own nor its class's)")]
    NoRoute(CategoryCode),
    #[error(
        "route for category {category}: {field} must be between 1 and {LIMIT_MINUTES_MAX} minutes, got {value}"
    )]
    Limit {
        category: CategoryCode,
        field: &'static str,
        value: u32,
    },
    #[error(
        "route for category {category}: response limit {response} exceeds resolution limit {resolution}"
    )]
    ResponseAfterResolution {
        category: CategoryCode,
        response: u32,
        resolution: u32,
    },
    #[error("route for category {category}: {field} lists more than {max} departments")]
    TooManyListed {
        category: CategoryCode,
        field: &'static str,
        max: usize,
    },
    #[error(
        "whistle {kind:?}: report limit must be between 1 and {LIMIT_MINUTES_MAX} minutes, got {value}"
    )]
    WhistleLimit { kind: WhistleKind, value: u32 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDepartment {
    id: String,
    name: String,
    name_en: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    category: String,
    #[serde(default)]
    street: Option<String>,
    #[serde(default)]
    level: Option<HandlingLevel>,
    department: String,
    response_minutes: u32,
    resolution_minutes: u32,
    #[serde(default)]
    summon: Vec<String>,
    #[serde(default)]
    fallback: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    city: String,
    whistle: WhistleLimits,
    #[serde(rename = "department")]
    departments: Vec<FileDepartment>,
    #[serde(rename = "route")]
    routes: Vec<FileRoute>,
    #[serde(rename = "street_route", default)]
    street_routes: Vec<FileRoute>,
}

/// A validated routing table.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    pub city: String,
    pub whistle: WhistleLimits,
    departments: BTreeMap<DepartmentId, Department>,
    /// Resolved route for every leaf category of the taxonomy.
    routes: BTreeMap<CategoryCode, Route>,
    overrides: BTreeMap<(StreetCode, CategoryCode), Route>,
}

impl RoutingTable {
    /// Parses a routing file's text and validates it against `taxonomy`.
    pub fn parse(text: &str, taxonomy: &Taxonomy) -> Result<RoutingTable, RoutingError> {
        let file: File = toml::from_str(text)?;
        for (kind, value) in [
            (
                WhistleKind::Routine,
                file.whistle.routine.report_limit_minutes,
            ),
            (WhistleKind::Tough, file.whistle.tough.report_limit_minutes),
            (
                WhistleKind::Emergency,
                file.whistle.emergency.report_limit_minutes,
            ),
        ] {
            if value == 0 || value > LIMIT_MINUTES_MAX {
                return Err(RoutingError::WhistleLimit { kind, value });
            }
        }
        if file.departments.len() > DEPARTMENTS_MAX {
            return Err(RoutingError::TooManyDepartments {
                count: file.departments.len(),
            });
        }
        let count = file.routes.len() + file.street_routes.len();
        if count > ROUTES_MAX {
            return Err(RoutingError::TooManyRoutes { count });
        }
        let mut departments = BTreeMap::new();
        for d in file.departments {
            let id: DepartmentId =
                d.id.parse()
                    .map_err(|source| RoutingError::BadDepartmentId {
                        id: d.id.clone(),
                        source,
                    })?;
            let department = Department {
                id,
                name_zh: d.name,
                name_en: d.name_en,
            };
            if departments.insert(id, department).is_some() {
                return Err(RoutingError::DuplicateDepartment(id));
            }
        }
        let resolve = |r: &FileRoute| -> Result<(CategoryCode, Route), RoutingError> {
            let category: CategoryCode =
                r.category
                    .parse()
                    .map_err(|source| RoutingError::BadCategory {
                        category: r.category.clone(),
                        source,
                    })?;
            let Some(known) = taxonomy.get(category) else {
                return Err(RoutingError::UnknownCategory(category));
            };
            let department_of = |name: &String| -> Result<DepartmentId, RoutingError> {
                let unknown = || RoutingError::UnknownDepartment {
                    category,
                    department: name.clone(),
                };
                let id: DepartmentId = name.parse().map_err(|_| unknown())?;
                departments
                    .contains_key(&id)
                    .then_some(id)
                    .ok_or_else(unknown)
            };
            for (field, value) in [
                ("response_minutes", r.response_minutes),
                ("resolution_minutes", r.resolution_minutes),
            ] {
                if value == 0 || value > LIMIT_MINUTES_MAX {
                    return Err(RoutingError::Limit {
                        category,
                        field,
                        value,
                    });
                }
            }
            if r.response_minutes > r.resolution_minutes {
                return Err(RoutingError::ResponseAfterResolution {
                    category,
                    response: r.response_minutes,
                    resolution: r.resolution_minutes,
                });
            }
            let department = department_of(&r.department)?;
            let mut summon = vec![department];
            for name in &r.summon {
                let id = department_of(name)?;
                if !summon.contains(&id) {
                    summon.push(id);
                }
            }
            if summon.len() > SUMMONS_MAX {
                return Err(RoutingError::TooManyListed {
                    category,
                    field: "summon",
                    max: SUMMONS_MAX,
                });
            }
            let fallback = r
                .fallback
                .iter()
                .map(department_of)
                .collect::<Result<Vec<_>, _>>()?;
            if fallback.len() > FALLBACKS_MAX {
                return Err(RoutingError::TooManyListed {
                    category,
                    field: "fallback",
                    max: FALLBACKS_MAX,
                });
            }
            let route = Route {
                level: r.level.unwrap_or(known.default_level),
                department,
                response_minutes: r.response_minutes,
                resolution_minutes: r.resolution_minutes,
                clock: if known.emergency {
                    Clock::Wall
                } else {
                    Clock::Working
                },
                summon,
                fallback,
            };
            Ok((category, route))
        };
        let mut given = BTreeMap::new();
        for r in &file.routes {
            if r.street.is_some() {
                return Err(RoutingError::BadStreet {
                    street: r.street.clone().unwrap_or_default(),
                    source: crate::ids::CodeError::Street(
                        "street belongs in [[street_route]]".to_owned(),
                    ),
                });
            }
            let (category, route) = resolve(r)?;
            if given.insert(category, route).is_some() {
                return Err(RoutingError::DuplicateRoute(category));
            }
        }
        let mut routes = BTreeMap::new();
        for leaf in taxonomy.leaves() {
            let route = given
                .get(&leaf.code)
                .or_else(|| leaf.code.parent().and_then(|p| given.get(&p)))
                .ok_or(RoutingError::NoRoute(leaf.code))?;
            let mut route = route.clone();
            // A class route's clock follows each subclass's own emergency flag.
            route.clock = if leaf.emergency {
                Clock::Wall
            } else {
                Clock::Working
            };
            routes.insert(leaf.code, route);
        }
        let mut overrides = BTreeMap::new();
        for r in &file.street_routes {
            let street_text = r.street.clone().unwrap_or_default();
            let street: StreetCode =
                street_text
                    .parse()
                    .map_err(|source| RoutingError::BadStreet {
                        street: street_text.clone(),
                        source,
                    })?;
            let (category, route) = resolve(r)?;
            // An override on a class applies to every leaf of that class.
            let leaves: Vec<CategoryCode> = taxonomy
                .leaves()
                .filter(|l| l.code == category || l.code.parent() == Some(category))
                .map(|l| l.code)
                .collect();
            for leaf in leaves {
                let mut route = route.clone();
                route.clock = if taxonomy.get(leaf).is_some_and(|c| c.emergency) {
                    Clock::Wall
                } else {
                    Clock::Working
                };
                if overrides.insert((street, leaf), route).is_some() {
                    return Err(RoutingError::DuplicateRoute(leaf));
                }
            }
        }
        Ok(RoutingTable {
            city: file.city,
            whistle: file.whistle,
            departments,
            routes,
            overrides,
        })
    }

    /// The route for `category` in `street`: the street's override if any, else the city's.
    /// `None` only for a category that is not a leaf of the taxonomy this table was built on.
    pub fn route(&self, category: CategoryCode, street: StreetCode) -> Option<&Route> {
        self.overrides
            .get(&(street, category))
            .or_else(|| self.routes.get(&category))
    }

    /// Whether `street` overrides the city's route for `category`.
    pub fn has_override(&self, category: CategoryCode, street: StreetCode) -> bool {
        self.overrides.contains_key(&(street, category))
    }

    pub fn department(&self, id: DepartmentId) -> Option<&Department> {
        self.departments.get(&id)
    }

    pub fn departments(&self) -> impl Iterator<Item = &Department> {
        self.departments.values()
    }

    /// All departments any route or override can send a case or a whistle to.
    pub fn routed_departments(&self) -> BTreeSet<DepartmentId> {
        self.routes
            .values()
            .chain(self.overrides.values())
            .flat_map(|r| r.summon.iter().chain(r.fallback.iter()).copied())
            .collect()
    }
}
