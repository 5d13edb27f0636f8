//! The pure check of one community against one profile.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::facts::CommunityFacts;
use crate::profile::{Basis, Measure, Period, Profile, Requirement, Rounding, Rule};

/// Verdict of one rule for one community.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Met,
    NotMet,
    /// A fact the rule needs is not known; never counted as a pass or a fail.
    Unknown,
    /// The rule is about other communities (another district kind, new communities only…).
    NotApplicable,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::NotMet => "not met",
            Status::Unknown => "unknown",
            Status::NotApplicable => "n/a",
        }
    }
}

/// Where a rule comes from: document, city, year and the quoted clause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Citation {
    pub file: String,
    pub title: String,
    pub city: String,
    pub year: u16,
    pub clause: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Inclusive bounds on the measure; `None` means unbounded on that side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Bounds {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Bounds {
    fn contains(self, value: f64) -> bool {
        self.min.is_none_or(|min| value >= min) && self.max.is_none_or(|max| value <= max)
    }
}

/// What a rule requires of this community: met when the actual value lies in any of `any_of`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Required {
    pub any_of: Vec<Bounds>,
    /// The same, for people, with how it was derived.
    pub text: String,
}

/// One rule's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Finding {
    pub rule_id: String,
    pub title: String,
    pub measure: Measure,
    pub unit: String,
    /// Absent when the rule does not apply or its basis is unknown.
    pub required: Option<Required>,
    pub actual: Option<f64>,
    pub status: Status,
    /// Why the status is unknown or not applicable; empty otherwise.
    pub reason: String,
    pub citation: Citation,
}

/// How many findings have each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Summary {
    pub met: u32,
    pub not_met: u32,
    pub unknown: u32,
    pub not_applicable: u32,
}

/// One community checked against one city's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComplianceReport {
    pub city: String,
    pub city_name: String,
    pub households: u32,
    pub findings: Vec<Finding>,
    pub summary: Summary,
}

/// Checks `facts` against every rule of `profile`. Pure: no IO, no clock.
pub fn evaluate(profile: &Profile, facts: &CommunityFacts) -> ComplianceReport {
    let findings: Vec<Finding> = profile
        .rules
        .iter()
        .map(|rule| evaluate_rule(profile, rule, facts))
        .collect();
    let mut summary = Summary::default();
    for finding in &findings {
        let count = match finding.status {
            Status::Met => &mut summary.met,
            Status::NotMet => &mut summary.not_met,
            Status::Unknown => &mut summary.unknown,
            Status::NotApplicable => &mut summary.not_applicable,
        };
        *count += 1;
    }
    ComplianceReport {
        city: profile.city.clone(),
        city_name: profile.name.clone(),
        households: facts.households,
        findings,
        summary,
    }
}

enum Applicability {
    Applies,
    NotApplicable(String),
    Unknown(String),
}

fn applicability(rule: &Rule, facts: &CommunityFacts) -> Applicability {
    if let Some(districts) = &rule.applies.districts {
        let kinds: Vec<&str> = districts.iter().map(|kind| kind.label()).collect();
        match facts.district {
            None => {
                return Applicability::Unknown(format!(
                    "district unknown (rule is for {} districts)",
                    kinds.join("/")
                ));
            }
            Some(kind) if !districts.contains(&kind) => {
                return Applicability::NotApplicable(format!(
                    "rule is for {} districts, community is {}",
                    kinds.join("/"),
                    kind.label()
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(newly_built) = rule.applies.newly_built {
        let wanted = if newly_built { "new" } else { "existing" };
        match facts.newly_built {
            None => {
                return Applicability::Unknown(format!(
                    "newly_built unknown (rule is for {wanted} communities)"
                ));
            }
            Some(actual) if actual != newly_built => {
                return Applicability::NotApplicable(format!("rule is for {wanted} communities"));
            }
            Some(_) => {}
        }
    }
    Applicability::Applies
}

fn evaluate_rule(profile: &Profile, rule: &Rule, facts: &CommunityFacts) -> Finding {
    let citation = citation(profile, rule);
    let actual = rule.measure.actual(facts).filter(|value| value.is_finite());
    let mut finding = Finding {
        rule_id: rule.id.clone(),
        title: rule.title.clone(),
        measure: rule.measure,
        unit: rule.measure.unit().to_owned(),
        required: None,
        actual,
        status: Status::Unknown,
        reason: String::new(),
        citation,
    };
    let applies_unknown = match applicability(rule, facts) {
        Applicability::NotApplicable(reason) => {
            finding.status = Status::NotApplicable;
            finding.reason = reason;
            return finding;
        }
        Applicability::Unknown(reason) => Some(reason),
        Applicability::Applies => None,
    };
    let derived = match required(rule, facts) {
        Ok(derived) => derived,
        Err(missing) => {
            finding.reason = format!("{} unknown", missing.label());
            return finding;
        }
    };
    let within = actual.map(|value| derived.required.any_of.iter().any(|b| b.contains(value)));
    finding.required = Some(derived.required);
    (finding.status, finding.reason) = match (applies_unknown, within) {
        (Some(reason), _) => (Status::Unknown, reason),
        (None, None) => (Status::Unknown, format!("{} unknown", rule.measure.label())),
        (None, Some(true)) => (Status::Met, String::new()),
        (None, Some(false)) => match derived.unchecked_alternative {
            Some(missing) => (
                Status::Unknown,
                format!(
                    "not met by households; {} unknown for the alternative",
                    missing.label()
                ),
            ),
            None => (Status::NotMet, String::new()),
        },
    };
    finding
}

fn citation(profile: &Profile, rule: &Rule) -> Citation {
    // `Profile::validate` guarantees the document exists; fall back to the bare file name.
    let document = profile.document(&rule.source);
    Citation {
        file: rule.source.clone(),
        title: document.map(|d| d.title.clone()).unwrap_or_default(),
        city: document.map(|d| d.city.clone()).unwrap_or_default(),
        year: document.map(|d| d.year).unwrap_or_default(),
        clause: rule.clause.clone(),
        note: rule.note.clone(),
    }
}

struct Derived {
    required: Required,
    /// A basis whose alternative requirement could not be computed (grid size by population).
    unchecked_alternative: Option<Basis>,
}

impl Derived {
    fn single(required: Required) -> Derived {
        Derived {
            required,
            unchecked_alternative: None,
        }
    }
}

/// The requirement for this community, or the basis fact that is missing to compute it.
fn required(rule: &Rule, facts: &CommunityFacts) -> Result<Derived, Basis> {
    let unit = rule.measure.unit();
    let per_year = rule.period.per_year();
    let scale = |value: Option<f64>| value.map(|value| value * per_year);
    match &rule.require {
        Requirement::Range { min, max } => {
            let bounds = Bounds {
                min: scale(*min),
                max: scale(*max),
            };
            Ok(Derived::single(Required {
                any_of: vec![bounds],
                text: bounds_text(bounds, unit, rule.period),
            }))
        }
        Requirement::PerUnit {
            basis,
            per,
            amount,
            rounding,
            floor,
            cap,
        } => {
            let basis_value = basis.value(facts).ok_or(*basis)?;
            let proportional = basis_value * amount / per;
            let mut value = match rounding {
                Rounding::None => proportional,
                Rounding::Up => proportional.ceil(),
            };
            if let Some(floor) = floor {
                value = value.max(*floor);
            }
            if let Some(cap) = cap {
                value = value.min(*cap);
            }
            let bounds = Bounds {
                min: Some(value * per_year),
                max: None,
            };
            let mut how = if *per == 1.0 {
                format!("{} per {}", num(*amount), basis.noun(1.0))
            } else {
                format!("{} per {} {}", num(*amount), num(*per), basis.noun(*per))
            };
            if let Some(floor) = floor {
                how.push_str(&format!(", at least {}", num(*floor)));
            }
            if let Some(cap) = cap {
                how.push_str(&format!(", at most {} required", num(*cap)));
            }
            Ok(Derived::single(Required {
                any_of: vec![bounds],
                text: format!("{} ({how})", bounds_text(bounds, unit, rule.period)),
            }))
        }
        Requirement::Bands { basis, bands } => {
            let basis_value = basis.value(facts).ok_or(*basis)?;
            // Validation guarantees contiguous bands from 0 with an open last band, so one
            // always matches; the last band is the fallback for safety.
            let band = bands
                .iter()
                .find(|band| {
                    basis_value >= f64::from(band.from)
                        && band.to.is_none_or(|to| basis_value <= f64::from(to))
                })
                .or(bands.last());
            let Some(band) = band else {
                return Err(*basis);
            };
            let bounds = Bounds {
                min: scale(band.min),
                max: scale(band.max),
            };
            let range = match band.to {
                Some(to) => format!("{}–{to}", band.from),
                None => format!("≥ {}", band.from),
            };
            Ok(Derived::single(Required {
                any_of: vec![bounds],
                text: format!(
                    "{} (band {range} {})",
                    bounds_text(bounds, unit, rule.period),
                    basis.noun(2.0)
                ),
            }))
        }
        Requirement::GridSize {
            households_per_grid,
            population_per_grid,
        } => {
            let by_households = grid_bounds(facts.households, *households_per_grid);
            let mut any_of = vec![by_households];
            let mut text = format!(
                "{} ({households_per_grid} households per grid",
                bounds_text(by_households, unit, Period::Year)
            );
            let mut unchecked_alternative = None;
            if let Some(population_per_grid) = population_per_grid {
                match facts.population {
                    Some(population) => {
                        let by_population = grid_bounds(population, *population_per_grid);
                        any_of.push(by_population);
                        text.push_str(&format!(
                            ") or {} ({population_per_grid} people per grid)",
                            bounds_text(by_population, unit, Period::Year)
                        ));
                    }
                    None => {
                        unchecked_alternative = Some(Basis::Population);
                        text.push_str(&format!(
                            "; or {population_per_grid} people per grid, population unknown)"
                        ));
                    }
                }
            } else {
                text.push(')');
            }
            Ok(Derived {
                required: Required { any_of, text },
                unchecked_alternative,
            })
        }
    }
}

/// Grid counts whose average size is "about" `per_grid`: the floor and ceiling of
/// `amount / per_grid`, and never fewer than one grid.
fn grid_bounds(amount: u32, per_grid: u32) -> Bounds {
    let per_grid = per_grid.max(1);
    let low = (amount / per_grid).max(1);
    let high = amount.div_ceil(per_grid).max(1);
    Bounds {
        min: Some(f64::from(low)),
        max: Some(f64::from(high)),
    }
}

fn bounds_text(bounds: Bounds, unit: &str, period: Period) -> String {
    let core = match (bounds.min, bounds.max) {
        (Some(min), Some(max)) if min == max => format!("= {}", num(min)),
        (Some(min), Some(max)) => format!("{}–{}", num(min), num(max)),
        (Some(min), None) => format!("≥ {}", num(min)),
        (None, Some(max)) => format!("≤ {}", num(max)),
        (None, None) => "any".to_owned(),
    };
    match period {
        Period::Year => format!("{core} {unit}"),
        Period::Month => {
            let monthly = Bounds {
                min: bounds.min.map(|v| v / 12.0),
                max: bounds.max.map(|v| v / 12.0),
            };
            format!(
                "{core} {unit} = {}/month",
                bounds_text(monthly, "yuan", Period::Year)
            )
        }
    }
}

/// A number without a trailing `.0`, with at most two decimals.
pub(crate) fn num(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').to_owned()
    }
}

impl ComplianceReport {
    /// A plain-text table, one line per rule: id, status, required, actual, reason.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .findings
            .iter()
            .map(|finding| {
                [
                    finding.rule_id.clone(),
                    finding.status.label().to_owned(),
                    finding
                        .required
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |required| required.text.clone()),
                    finding.actual.map_or_else(|| "?".to_owned(), num),
                    finding.reason.clone(),
                ]
            })
            .collect();
        let header = ["rule", "status", "required", "actual", "reason"].map(str::to_owned);
        let mut widths = [0_usize; 5];
        for row in std::iter::once(&header).chain(&rows) {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
                line.push_str(cell);
                if column + 1 < row.len() {
                    let pad = width - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let Summary {
            met,
            not_met,
            unknown,
            not_applicable,
        } = self.summary;
        out.push_str(&format!(
            "{met} met, {not_met} not met, {unknown} unknown, {not_applicable} n/a\n"
        ));
        out
    }
}
