//! The registry's working state: every community folded from the GRIDS stream, and the locate
//! index built from their grids, published to [`Locator`] handles through a `watch` channel so
//! readers never wait for the writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use eventstore::{Position, RecordedCommit};
use geo::BoundingRect as _;
use partition::locate::{LocateError, LocateIndex, Located};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{AABB, RTree};
use tokio::sync::watch;

use crate::api::LocateAnswer;
use crate::domain::{Community, Event, GridWorker, evolve};

/// One community's part of the locate view: its own grid index, rebuilt only when the
/// community changes.
#[derive(Debug)]
struct CommunityView {
    community_id: String,
    community_code: String,
    community_name: String,
    street: String,
    district: String,
    index: LocateIndex,
    workers: HashMap<String, GridWorker>,
    grids: usize,
}

impl CommunityView {
    fn build(entry: &Entry) -> Result<Option<CommunityView>, LocateError> {
        let community = &entry.community;
        let Some(profile) = &community.profile else {
            return Ok(None);
        };
        let mut polygons = Vec::new();
        for (code, grid) in &community.grids {
            for polygon in std::iter::once(&grid.polygon).chain(&grid.detached) {
                polygons.push((code.clone(), community.id.clone(), polygon.clone()));
            }
        }
        Ok(Some(CommunityView {
            community_id: community.id.clone(),
            community_code: profile.code.clone(),
            community_name: profile.name.clone(),
            street: profile.street.clone(),
            district: profile.district.clone(),
            index: LocateIndex::build(polygons)?,
            workers: community
                .workers
                .iter()
                .map(|(code, worker)| (code.clone(), worker.clone()))
                .collect(),
            grids: community.grids.len(),
        }))
    }

    /// The community's extent: the bounding box of its grids.
    fn extent(entry: &Entry) -> Option<Rectangle<[f64; 2]>> {
        let mut rect: Option<geo::Rect<f64>> = None;
        for grid in entry.community.grids.values() {
            for polygon in std::iter::once(&grid.polygon).chain(&grid.detached) {
                if let Some(r) = polygon.bounding_rect() {
                    rect = Some(match rect {
                        None => r,
                        Some(acc) => geo::Rect::new(
                            geo::Coord {
                                x: acc.min().x.min(r.min().x),
                                y: acc.min().y.min(r.min().y),
                            },
                            geo::Coord {
                                x: acc.max().x.max(r.max().x),
                                y: acc.max().y.max(r.max().y),
                            },
                        ),
                    });
                }
            }
        }
        rect.map(|r| Rectangle::from_corners([r.min().x, r.min().y], [r.max().x, r.max().y]))
    }
}

/// An immutable view for locating points: an R-tree of community extents over one grid index
/// per community, so a change rebuilds one community's index and the (small) top tree.
#[derive(Debug)]
pub struct LocateView {
    communities: Vec<Arc<CommunityView>>,
    tree: RTree<GeomWithData<Rectangle<[f64; 2]>, usize>>,
    grids: usize,
}

impl LocateView {
    fn empty() -> LocateView {
        LocateView {
            communities: Vec::new(),
            tree: RTree::new(),
            grids: 0,
        }
    }

    pub fn grids(&self) -> usize {
        self.grids
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
        for candidate in self
            .tree
            .locate_in_envelope_intersecting(&AABB::from_point([lon, lat]))
        {
            let view = &self.communities[candidate.data];
            if let Located::Grid { grid_code, .. } = view.index.locate(lon, lat) {
                return LocateAnswer::Served {
                    community: view.community_id.clone(),
                    community_code: view.community_code.clone(),
                    community_name: view.community_name.clone(),
                    grid_code: grid_code.to_owned(),
                    grid_worker: view.workers.get(grid_code).cloned(),
                    street: view.street.clone(),
                    district: view.district.clone(),
                };
            }
        }
        LocateAnswer::Unserved
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
    /// Per community: its locate part and extent, as last published.
    views: BTreeMap<String, (Arc<CommunityView>, Rectangle<[f64; 2]>)>,
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
            views: BTreeMap::new(),
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

    /// Rebuilds every community's locate part and publishes (after a catch-up).
    pub fn publish_all(&mut self) -> Result<usize, LocateError> {
        self.views.clear();
        let ids: Vec<String> = self.communities.keys().cloned().collect();
        for id in &ids {
            self.refresh(id)?;
        }
        Ok(self.publish())
    }

    /// Rebuilds one community's locate part and publishes.
    pub fn publish_community(&mut self, community_id: &str) -> Result<usize, LocateError> {
        self.refresh(community_id)?;
        Ok(self.publish())
    }

    fn refresh(&mut self, community_id: &str) -> Result<(), LocateError> {
        self.views.remove(community_id);
        if let Some(entry) = self.communities.get(community_id)
            && let Some(view) = CommunityView::build(entry)?
            && let Some(extent) = CommunityView::extent(entry)
        {
            self.views
                .insert(community_id.to_owned(), (Arc::new(view), extent));
        }
        Ok(())
    }

    /// Publishes a new view from the current community parts; returns the grids indexed.
    fn publish(&self) -> usize {
        let mut communities = Vec::with_capacity(self.views.len());
        let mut boxes = Vec::with_capacity(self.views.len());
        let mut grids = 0;
        for (view, extent) in self.views.values() {
            boxes.push(GeomWithData::new(*extent, communities.len()));
            grids += view.grids;
            communities.push(Arc::clone(view));
        }
        self.publisher.send_replace(Arc::new(LocateView {
            communities,
            tree: RTree::bulk_load(boxes),
            grids,
        }));
        grids
    }
}
