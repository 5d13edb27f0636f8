//! The registry's working state: every community folded from the GRIDS stream, and the locate
//! index built from their grids, published to [`Locator`] handles through a `watch` channel so
//! readers never wait for the writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use eventstore::{Position, RecordedCommit};
use partition::locate::{LocateError, LocateIndex, Located};
use tokio::sync::watch;

use crate::api::LocateAnswer;
use crate::domain::{Community, Event, GridWorker, evolve};

/// What a located grid answers besides its code.
#[derive(Debug, Clone)]
struct GridFacts {
    community_id: String,
    community_code: String,
    community_name: String,
    street: String,
    district: String,
    grid_worker: Option<GridWorker>,
}

/// An immutable view for locating points.
#[derive(Debug)]
pub struct LocateView {
    index: LocateIndex,
    grids: HashMap<String, GridFacts>,
}

impl LocateView {
    fn empty() -> LocateView {
        LocateView {
            index: LocateIndex::build(std::iter::empty()).expect("an empty index builds"),
            grids: HashMap::new(),
        }
    }

    pub fn grids(&self) -> usize {
        self.grids.len()
    }

    pub fn locate(&self, lon: f64, lat: f64) -> LocateAnswer {
        if !(lon.is_finite() && lat.is_finite()) {
            return LocateAnswer::rejected("bad_coordinates", "lon and lat must be finite");
        }
        if !(-180.0..=180.0).contains(&lon) || !(-90.0..=90.0).contains(&lat) {
            return LocateAnswer::rejected(
                "bad_coordinates",
                format!("({lon}, {lat}) is outside WGS84 lon -180..180, lat -90..90"),
            );
        }
        match self.index.locate(lon, lat) {
            Located::Unserved => LocateAnswer::Unserved,
            Located::Grid { grid_code, .. } => match self.grids.get(grid_code) {
                Some(facts) => LocateAnswer::Served {
                    community: facts.community_id.clone(),
                    community_code: facts.community_code.clone(),
                    community_name: facts.community_name.clone(),
                    grid_code: grid_code.to_owned(),
                    grid_worker: facts.grid_worker.clone(),
                    street: facts.street.clone(),
                    district: facts.district.clone(),
                },
                None => LocateAnswer::Unserved,
            },
        }
    }
}

/// In-process locate handle: cheap to clone, never blocks on the registry's writer, always
/// answers from the latest published state.
#[derive(Debug, Clone)]
pub struct Locator {
    view: watch::Receiver<Arc<LocateView>>,
}

impl Locator {
    /// Which grid serves (lon, lat) (WGS84 degrees)?
    pub fn locate(&self, lon: f64, lat: f64) -> LocateAnswer {
        let view = Arc::clone(&self.view.borrow());
        view.locate(lon, lat)
    }

    /// Grids currently indexed.
    pub fn grids(&self) -> usize {
        self.view.borrow().grids()
    }
}

/// One community with where it stands in the stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub community: Community,
    pub position: Position,
}

/// Why a commit could not be folded in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "community {community}: commit at sequence {sequence} starts at version {first_version} but the registry holds version {held}"
    )]
    Gap {
        community: String,
        sequence: u64,
        first_version: u64,
        held: u64,
    },
}

/// Whether a commit was new to the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    AlreadyHeld,
}

/// All communities, keyed by community id (= aggregate id).
#[derive(Debug)]
pub struct Directory {
    communities: BTreeMap<String, Entry>,
    publisher: watch::Sender<Arc<LocateView>>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new()
    }
}

impl Directory {
    pub fn new() -> Directory {
        let (publisher, _) = watch::channel(Arc::new(LocateView::empty()));
        Directory {
            communities: BTreeMap::new(),
            publisher,
        }
    }

    pub fn locator(&self) -> Locator {
        Locator {
            view: self.publisher.subscribe(),
        }
    }

    pub fn get(&self, community_id: &str) -> Option<&Entry> {
        self.communities.get(community_id)
    }

    pub fn communities(&self) -> usize {
        self.communities.len()
    }

    /// The community to decide on: the held one, or a fresh unregistered one.
    pub fn community_or_new(&self, community_id: &str) -> Entry {
        self.communities
            .get(community_id)
            .cloned()
            .unwrap_or_else(|| Entry {
                community: Community::new(community_id),
                position: Position::NEW,
            })
    }

    /// Folds a stored commit in. A commit the directory already holds (its own append coming
    /// back through the subscription, or a redelivery) is skipped.
    pub fn apply(&mut self, commit: &RecordedCommit<Event>) -> Result<Applied, ApplyError> {
        let id = commit.aggregate.as_str();
        let held = self
            .communities
            .get(id)
            .map(|e| e.position)
            .unwrap_or(Position::NEW);
        if commit.sequence <= held.sequence || commit.version <= held.version {
            return Ok(Applied::AlreadyHeld);
        }
        if commit.first_version != held.version + 1 {
            return Err(ApplyError::Gap {
                community: id.to_owned(),
                sequence: commit.sequence,
                first_version: commit.first_version,
                held: held.version,
            });
        }
        let entry = self
            .communities
            .entry(id.to_owned())
            .or_insert_with(|| Entry {
                community: Community::new(id),
                position: Position::NEW,
            });
        for recorded in &commit.events {
            evolve(&mut entry.community, &recorded.event);
        }
        entry.community.note_command(&commit.command_id);
        entry.position = commit.position();
        Ok(Applied::New)
    }

    /// Folds events this instance just appended (known to be stored at `position`).
    pub fn apply_own(
        &mut self,
        community_id: &str,
        command_id: &str,
        events: &[Event],
        position: Position,
    ) {
        let entry = self
            .communities
            .entry(community_id.to_owned())
            .or_insert_with(|| Entry {
                community: Community::new(community_id),
                position: Position::NEW,
            });
        for event in events {
            evolve(&mut entry.community, event);
        }
        entry.community.note_command(command_id);
        entry.position = position;
    }

    /// Rebuilds the locate index from every grid and publishes it to all [`Locator`]s.
    pub fn publish(&self) -> Result<usize, LocateError> {
        let mut grids = HashMap::new();
        let mut polygons = Vec::new();
        for (id, entry) in &self.communities {
            let Some(profile) = &entry.community.profile else {
                continue;
            };
            for (code, grid) in &entry.community.grids {
                grids.insert(
                    code.clone(),
                    GridFacts {
                        community_id: id.clone(),
                        community_code: profile.code.clone(),
                        community_name: profile.name.clone(),
                        street: profile.street.clone(),
                        district: profile.district.clone(),
                        grid_worker: entry.community.workers.get(code).cloned(),
                    },
                );
                for polygon in std::iter::once(&grid.polygon).chain(&grid.detached) {
                    polygons.push((code.clone(), id.clone(), polygon.clone()));
                }
            }
        }
        let index = LocateIndex::build(polygons)?;
        let count = grids.len();
        self.publisher
            .send_replace(Arc::new(LocateView { index, grids }));
        Ok(count)
    }
}
