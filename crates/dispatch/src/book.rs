//! The in-memory book of incidents: every incident's state and position, folded from the
//! INCIDENTS stream in order, and a deadline index rebuilt from those states.
//!
//! Pure (no IO, no clock) so it is tested without a server. The deadline index is a binary
//! heap of `(deadline, incident)` with lazy deletion: a state change that moves an incident's
//! next deadline pushes the new one, and stale entries are dropped when they surface (their
//! incident's [`domain::next_deadline`] no longer matches). The heap is rebuilt when it holds
//! more than twice as many entries as incidents held (open, and ended up to
//! [`ENDED_HELD_MAX`]) plus 1,024, so stale entries never outnumber the held incidents by
//! more than that.
//!
//! Ended incidents (closed, merged, rejected, cancelled) are kept only up to
//! [`ENDED_HELD_MAX`]: a city files incidents for years, and a book of all of them grew
//! without bound (≈480 bytes each; past 1,000,000 its snapshot was refused and every start
//! replayed the whole stream). One dropped is read from the store again when it is needed:
//! a later commit on it (a rating, a reopening) arrives as a gap, and a console command on an
//! incident the book does not hold looks in the store before refusing.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use domain::incident::{IncidentEvent, IncidentState, Status};
use domain::{IncidentId, Timestamp, next_deadline};
use eventstore::{AggregateId, Position, RecordedCommit};
use serde::{Deserialize, Serialize};

/// Ended incidents the book keeps; beyond it, the one whose last commit was folded longest
/// ago is dropped from memory (read from the store again if it is ever needed).
pub const ENDED_HELD_MAX: usize = 100_000;

/// Distinct aggregate-id layouts (prefix before the incident uuid) the book remembers.
pub const AGGREGATE_TEMPLATES_MAX: usize = 64;

/// How an incident's aggregate id is spelled around its uuid: `<prefix>.<uuid>` (or just
/// `<uuid>`), hyphenated or simple. Learnt from the stream, so dispatch writes to exactly the
/// subject the intake service created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateTemplate {
    pub prefix: String,
    pub hyphenated: bool,
}

impl AggregateTemplate {
    /// Splits an aggregate id into its template and incident id; `None` when the last token is
    /// not a uuid.
    pub fn parse(aggregate: &AggregateId) -> Option<(AggregateTemplate, IncidentId)> {
        let text = aggregate.as_str();
        let (prefix, last) = match text.rsplit_once('.') {
            Some((prefix, last)) => (prefix, last),
            None => ("", text),
        };
        let uuid = uuid::Uuid::try_parse(last).ok()?;
        Some((
            AggregateTemplate {
                prefix: prefix.to_owned(),
                hyphenated: last.contains('-'),
            },
            IncidentId(uuid),
        ))
    }

    pub fn aggregate(&self, incident: IncidentId) -> AggregateId {
        let id = if self.hyphenated {
            incident.0.hyphenated().to_string()
        } else {
            incident.0.simple().to_string()
        };
        let text = if self.prefix.is_empty() {
            id
        } else {
            format!("{}.{id}", self.prefix)
        };
        AggregateId::new(text).expect("a valid prefix and a uuid make a valid aggregate id")
    }
}

/// The aggregate id dispatch expects intake to use: `<city>.<incident uuid, hyphenated>`.
pub fn incident_aggregate(city: &str, incident: IncidentId) -> AggregateId {
    AggregateTemplate {
        prefix: city.to_owned(),
        hyphenated: true,
    }
    .aggregate(incident)
}

/// One incident as held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub state: IncidentState,
    pub position: Position,
    /// Index into the book's aggregate templates.
    pub template: u8,
}

/// What applying a stored commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Folded in.
    New,
    /// Already held (own append, or a redelivery).
    AlreadyHeld,
    /// Commits are missing before this one: read the aggregate after `held`.
    Gap {
        incident: IncidentId,
        held: Position,
    },
    /// Not an incident aggregate this book can hold (logged and skipped).
    Foreign(String),
}

/// Memory figures of the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BookStats {
    pub incidents: usize,
    pub open_incidents: usize,
    pub pending_deadlines: usize,
    pub undispatched: usize,
    /// Bytes the book owns: map slots (key, value, control byte) by capacity, state heap
    /// bytes, the deadline heap and the undispatched set.
    pub held_bytes: usize,
    /// Last stream sequence folded in.
    pub reached_sequence: u64,
}

/// Every incident's state and position, and when each next falls due.
#[derive(Debug)]
pub struct Book {
    incidents: HashMap<IncidentId, Held>,
    deadlines: BinaryHeap<Reverse<(Timestamp, IncidentId)>>,
    /// Filed incidents not yet dispatched (dispatch decides their routing).
    undispatched: BTreeSet<IncidentId>,
    /// Ended incidents in the order their last commit was folded, with the version it left
    /// them at (an entry whose incident moved on since is stale and skipped).
    ended: VecDeque<(IncidentId, u64)>,
    /// Bound on `ended` ([`ENDED_HELD_MAX`]).
    ended_max: usize,
    templates: Vec<AggregateTemplate>,
    reached: u64,
}

impl Default for Book {
    fn default() -> Book {
        Book {
            incidents: HashMap::new(),
            deadlines: BinaryHeap::new(),
            undispatched: BTreeSet::new(),
            ended: VecDeque::new(),
            ended_max: ENDED_HELD_MAX,
            templates: Vec::new(),
            reached: 0,
        }
    }
}

impl Book {
    pub fn new() -> Book {
        Book::default()
    }

    pub fn get(&self, incident: IncidentId) -> Option<&Held> {
        self.incidents.get(&incident)
    }

    pub fn reached_sequence(&self) -> u64 {
        self.reached
    }

    pub fn len(&self) -> usize {
        self.incidents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.incidents.is_empty()
    }

    pub fn aggregate_of(&self, incident: IncidentId) -> Option<AggregateId> {
        let held = self.incidents.get(&incident)?;
        let template = self.templates.get(usize::from(held.template))?;
        Some(template.aggregate(incident))
    }

    /// The aggregate id layouts seen so far (at most `AGGREGATE_TEMPLATES_MAX`).
    pub fn templates(&self) -> &[AggregateTemplate] {
        &self.templates
    }

    /// Reserves room for `additional` incidents (the benchmark and snapshot loads know).
    pub fn reserve(&mut self, additional: usize) {
        self.incidents.reserve(additional);
    }

    fn template_index(&mut self, template: AggregateTemplate) -> Option<u8> {
        if let Some(at) = self.templates.iter().position(|t| *t == template) {
            return Some(at as u8);
        }
        if self.templates.len() >= AGGREGATE_TEMPLATES_MAX {
            return None;
        }
        self.templates.push(template);
        Some((self.templates.len() - 1) as u8)
    }

    /// Folds one stored commit in, delivered in stream order (by the replay or the
    /// subscription): the book has then seen every commit up to its sequence.
    pub fn apply_commit(&mut self, commit: &RecordedCommit<IncidentEvent>) -> Applied {
        self.reached = self.reached.max(commit.sequence);
        self.apply_read_back(commit)
    }

    /// Folds one stored commit in that was read out of stream order (an incident read again
    /// after a gap or a lost race): [`Book::reached_sequence`] does not move. It says up to
    /// where the book holds every commit, and a snapshot restarts the replay after it; raised
    /// by a commit read ahead of the subscription, it made a snapshot skip the commits in
    /// between (incidents filed there were never dispatched after a restart).
    pub fn apply_read_back(&mut self, commit: &RecordedCommit<IncidentEvent>) -> Applied {
        let Some((template, incident)) = AggregateTemplate::parse(&commit.aggregate) else {
            return Applied::Foreign(format!(
                "aggregate {} does not end in an incident uuid",
                commit.aggregate
            ));
        };
        let held_position = self
            .incidents
            .get(&incident)
            .map_or(Position::NEW, |h| h.position);
        if commit.version <= held_position.version {
            return Applied::AlreadyHeld;
        }
        if commit.first_version != held_position.version + 1 {
            return Applied::Gap {
                incident,
                held: held_position,
            };
        }
        let Some(template) = self.template_index(template) else {
            return Applied::Foreign(format!(
                "more than {AGGREGATE_TEMPLATES_MAX} aggregate id layouts"
            ));
        };
        self.fold(
            incident,
            template,
            commit.events.iter().map(|e| &e.event),
            commit.position(),
        );
        Applied::New
    }

    /// Folds the events of a commit this instance appended (known position after it).
    pub fn apply_own<'a>(
        &mut self,
        incident: IncidentId,
        events: impl IntoIterator<Item = &'a IncidentEvent>,
        position: Position,
    ) {
        let template = self.incidents.get(&incident).map_or(0, |h| h.template);
        if let Some(held) = self.incidents.get(&incident)
            && held.position.version >= position.version
        {
            return;
        }
        self.fold(incident, template, events, position);
    }

    fn fold<'a>(
        &mut self,
        incident: IncidentId,
        template: u8,
        events: impl IntoIterator<Item = &'a IncidentEvent>,
        position: Position,
    ) {
        let held = self.incidents.entry(incident).or_insert_with(|| Held {
            state: IncidentState::default(),
            position: Position::NEW,
            template,
        });
        let before = next_deadline(&held.state);
        for event in events {
            held.state.apply(event);
        }
        held.position = position;
        let after = next_deadline(&held.state);
        let status = held.state.status;
        if let Some(at) = after
            && before != after
        {
            self.deadlines.push(Reverse((at, incident)));
        }
        let ended = held.state.is_terminal();
        if status == Status::Filed {
            self.undispatched.insert(incident);
        } else {
            self.undispatched.remove(&incident);
        }
        if ended {
            self.remember_ended(incident, position.version);
        }
        if self.deadlines.len() > 2 * self.incidents.len() + 1024 {
            self.rebuild_deadlines();
        }
    }

    /// Notes that `incident` ended at `version`, and drops the incidents that ended longest
    /// ago beyond the bound (those still ended at the version noted: one that moved on since,
    /// by a rating or a reopening, has a later entry, or is open again).
    fn remember_ended(&mut self, incident: IncidentId, version: u64) {
        self.ended.push_back((incident, version));
        self.drop_ended_beyond_bound();
    }

    /// Sets the bound on ended incidents held (a book read from a snapshot is built with the
    /// default one) and drops those beyond it.
    pub fn set_ended_max(&mut self, ended_max: usize) {
        self.ended_max = ended_max;
        self.drop_ended_beyond_bound();
    }

    /// At least the incident noted last is kept, whatever the bound: it is the one just read
    /// back or folded, and a command may be about to decide on it.
    fn drop_ended_beyond_bound(&mut self) {
        while self.ended.len() > self.ended_max.max(1) {
            let Some((oldest, at)) = self.ended.pop_front() else {
                break;
            };
            if self
                .incidents
                .get(&oldest)
                .is_some_and(|held| held.state.is_terminal() && held.position.version == at)
            {
                self.incidents.remove(&oldest);
            }
        }
        debug_assert!(self.ended.len() <= self.ended_max.max(1));
    }

    /// Rebuilds the deadline index from the states (drops stale entries).
    pub fn rebuild_deadlines(&mut self) {
        let entries: Vec<Reverse<(Timestamp, IncidentId)>> = self
            .incidents
            .iter()
            .filter_map(|(id, held)| next_deadline(&held.state).map(|at| Reverse((at, *id))))
            .collect();
        self.deadlines = BinaryHeap::from(entries);
    }

    /// The earliest pending deadline (stale entries at the top are dropped first).
    pub fn next_deadline(&mut self) -> Option<Timestamp> {
        while let Some(Reverse((at, incident))) = self.deadlines.peek().copied() {
            let live = self
                .incidents
                .get(&incident)
                .and_then(|h| next_deadline(&h.state));
            if live == Some(at) {
                return Some(at);
            }
            self.deadlines.pop();
            if let Some(live) = live
                && live > at
            {
                // Moved later without a push (e.g. folded from a snapshot): keep it indexed.
                self.deadlines.push(Reverse((live, incident)));
            }
        }
        None
    }

    /// Takes up to `max` incidents whose next deadline is at or before `now`, earliest first.
    /// Each is taken out of the index; the caller re-adds it with [`Book::reschedule`] if its
    /// escalation could not be stored.
    pub fn take_due(&mut self, now: Timestamp, max: usize) -> Vec<(IncidentId, Timestamp)> {
        let mut due = Vec::new();
        while due.len() < max {
            match self.next_deadline() {
                Some(at) if at <= now => {
                    // An incident's live deadline can stand in the heap twice (pushed when its
                    // state moved, and again when a stale entry of it surfaced): taken once.
                    if let Some(Reverse((at, incident))) = self.deadlines.pop()
                        && !due.iter().any(|(taken, _)| *taken == incident)
                    {
                        due.push((incident, at));
                    }
                }
                _ => break,
            }
        }
        due
    }

    /// Puts an incident's current next deadline back into the index.
    pub fn reschedule(&mut self, incident: IncidentId) {
        if let Some(at) = self
            .incidents
            .get(&incident)
            .and_then(|h| next_deadline(&h.state))
        {
            self.deadlines.push(Reverse((at, incident)));
        }
    }

    /// Up to `max` filed incidents that wait for their dispatch decision; taken out of the set
    /// (one whose dispatch was not stored is put back with [`Book::requeue_undispatched`]).
    pub fn take_undispatched(&mut self, max: usize) -> Vec<IncidentId> {
        let mut taken = Vec::new();
        while taken.len() < max {
            match self.undispatched.pop_first() {
                Some(incident) => taken.push(incident),
                None => break,
            }
        }
        taken
    }

    /// Puts back those of `incidents` that are still filed (their dispatch was not stored).
    pub fn requeue_undispatched(&mut self, incidents: &[IncidentId]) {
        for incident in incidents {
            if self
                .incidents
                .get(incident)
                .is_some_and(|held| held.state.status == Status::Filed)
            {
                self.undispatched.insert(*incident);
            }
        }
    }

    pub fn has_undispatched(&self) -> bool {
        !self.undispatched.is_empty()
    }

    pub fn stats(&self) -> BookStats {
        use std::mem::size_of;
        let slot = size_of::<IncidentId>() + size_of::<Held>() + 1;
        let held_bytes = self.incidents.capacity() * slot
            + self
                .incidents
                .values()
                .map(|h| h.state.heap_bytes())
                .sum::<usize>()
            + self.deadlines.capacity() * size_of::<Reverse<(Timestamp, IncidentId)>>()
            + self.undispatched.len() * size_of::<IncidentId>() * 2;
        BookStats {
            incidents: self.incidents.len(),
            open_incidents: self
                .incidents
                .values()
                .filter(|h| !h.state.is_terminal())
                .count(),
            pending_deadlines: self
                .incidents
                .values()
                .filter(|h| next_deadline(&h.state).is_some())
                .count(),
            undispatched: self.undispatched.len(),
            held_bytes,
            reached_sequence: self.reached,
        }
    }

    /// Everything needed to rebuild the book without the stream: used by snapshots.
    pub fn parts(
        &self,
    ) -> (
        &[AggregateTemplate],
        impl Iterator<Item = (&IncidentId, &Held)>,
    ) {
        (&self.templates, self.incidents.iter())
    }

    /// Rebuilds a book from snapshot parts.
    pub fn from_parts(
        templates: Vec<AggregateTemplate>,
        incidents: impl IntoIterator<Item = (IncidentId, Held)>,
        reached: u64,
    ) -> Book {
        let mut book = Book {
            templates,
            reached,
            ..Book::default()
        };
        // Ended incidents, noted in the order they were last written, so that the ones that
        // ended longest ago leave the book first, as they would have without the restart.
        let mut ended = Vec::new();
        for (id, held) in incidents {
            if held.state.status == Status::Filed {
                book.undispatched.insert(id);
            }
            if held.state.is_terminal() {
                ended.push((held.position.sequence, id, held.position.version));
            }
            book.incidents.insert(id, held);
        }
        ended.sort_unstable();
        for (_, id, version) in ended {
            book.remember_ended(id, version);
        }
        book.rebuild_deadlines();
        book
    }
}

#[cfg(test)]
mod tests {
    use domain::incident::{Action, IncidentCommand};
    use domain::{Actor, ActorId, Policy, Role, decide};
    use eventstore::{CommitMeta, RecordedEvent};

    use super::*;

    /// Incident `n` reported and filed, as the commit stored at `sequence`.
    fn filed_commit(n: u128, sequence: u64) -> RecordedCommit<IncidentEvent> {
        let policy = Policy::embedded("sanming").expect("policy");
        let incident = IncidentId(uuid::Uuid::from_u128(n));
        let now = Timestamp(1_778_032_800_000);
        let mut state = IncidentState::default();
        let mut events = Vec::new();
        for (role, action) in [
            (
                Role::Resident,
                Action::Report {
                    incident,
                    description: "blocked drain".to_owned(),
                    position: None,
                    category_hint: None,
                },
            ),
            (
                Role::System,
                Action::File {
                    grid: "350402001002007".parse().expect("grid"),
                    category: "0101".parse().expect("category"),
                },
            ),
        ] {
            let actor = Actor {
                role,
                id: ActorId(uuid::Uuid::from_u128(7)),
            };
            for event in
                decide(&state, IncidentCommand { actor, action }, now, &policy).expect("decided")
            {
                state.apply(&event);
                events.push(event);
            }
        }
        RecordedCommit {
            aggregate: AggregateId::new(incident.0.hyphenated().to_string()).expect("id"),
            command_id: format!("intake:{n}"),
            sequence,
            first_version: 1,
            version: events.len() as u64,
            events: events
                .into_iter()
                .enumerate()
                .map(|(index, event)| RecordedEvent {
                    event_id: uuid::Uuid::from_u128(index as u128),
                    version: index as u64 + 1,
                    event_type: domain::encoding::event_type(&event).to_owned(),
                    event,
                })
                .collect(),
            meta: CommitMeta {
                correlation_id: uuid::Uuid::from_u128(1),
                causation_id: uuid::Uuid::from_u128(1),
                actor: "system:intake".to_owned(),
                occurred_at_ms: now.0,
                traceparent: None,
            },
            previous_hash: [0; 32],
            hash: [sequence as u8; 32],
            stored_at_ms: now.0,
        }
    }

    /// Incident `n`'s reporter cancels it: the commit after [`filed_commit`], at `sequence`.
    fn cancelled_commit(n: u128, sequence: u64) -> RecordedCommit<IncidentEvent> {
        let filed = filed_commit(n, sequence);
        let reporter = Actor {
            role: Role::Resident,
            id: ActorId(uuid::Uuid::from_u128(7)),
        };
        let event = IncidentEvent::Cancelled { by: reporter };
        let version = filed.version + 1;
        RecordedCommit {
            command_id: format!("cancel:{n}"),
            first_version: version,
            version,
            events: vec![RecordedEvent {
                event_id: uuid::Uuid::from_u128(99),
                version,
                event_type: domain::encoding::event_type(&event).to_owned(),
                event,
            }],
            ..filed
        }
    }

    /// An incident acknowledged after its dispatch has its resolution deadline pushed when the
    /// acknowledgement folds, and pushed again when the stale response entry surfaces: due, it
    /// is taken once (before, twice: two identical appends, one of them a lost race).
    #[test]
    fn a_due_incident_is_taken_once() {
        let policy = Policy::embedded("sanming").expect("policy");
        let filed = filed_commit(5, 1);
        let incident = IncidentId(uuid::Uuid::from_u128(5));
        let now = Timestamp(filed.stored_at_ms);
        let mut state = IncidentState::default();
        filed
            .events
            .iter()
            .for_each(|recorded| state.apply(&recorded.event));
        let decided = |state: &mut IncidentState, role, action| {
            let actor = Actor {
                role,
                id: ActorId(uuid::Uuid::from_u128(7)),
            };
            let events =
                decide(state, IncidentCommand { actor, action }, now, &policy).expect("decided");
            events.iter().for_each(|event| state.apply(event));
            events
        };
        let commit_of = |sequence: u64, first_version: u64, events: Vec<IncidentEvent>| {
            let version = first_version + events.len() as u64 - 1;
            RecordedCommit {
                command_id: format!("c{sequence}"),
                sequence,
                first_version,
                version,
                events: events
                    .into_iter()
                    .enumerate()
                    .map(|(index, event)| RecordedEvent {
                        event_id: uuid::Uuid::from_u128(
                            100 + sequence as u128 * 10 + index as u128,
                        ),
                        version: first_version + index as u64,
                        event_type: domain::encoding::event_type(&event).to_owned(),
                        event,
                    })
                    .collect(),
                hash: [sequence as u8; 32],
                ..filed.clone()
            }
        };
        let mut book = Book::new();
        book.apply_commit(&filed);
        let dispatched = decided(&mut state, Role::System, Action::Dispatch { to: None });
        book.apply_commit(&commit_of(2, filed.version + 1, dispatched));
        let handler = match state.handler.expect("dispatched") {
            domain::incident::Handler::Department(department) => Role::Department(department),
            domain::incident::Handler::GridWorker => Role::GridWorker,
            domain::incident::Handler::Community => Role::Community,
            domain::incident::Handler::Street => Role::Street,
        };
        let acknowledged = decided(&mut state, handler, Action::Acknowledge);
        let version = book.get(incident).expect("held").position.version;
        book.apply_commit(&commit_of(3, version + 1, acknowledged));
        let resolution = domain::next_deadline(&state).expect("a resolution deadline");
        // A loop turn looks at the next deadline: the stale response entry surfaces.
        book.next_deadline();
        assert_eq!(
            book.take_due(Timestamp(resolution.0 + 1), 256),
            vec![(incident, resolution)]
        );
    }

    /// Ended incidents beyond the bound leave the book, the one that ended first going first;
    /// a later commit on one comes back as a gap (the service then reads the incident).
    #[test]
    fn ended_incidents_beyond_the_bound_leave_the_book_oldest_first() {
        let id = |n: u128| IncidentId(uuid::Uuid::from_u128(n));
        let mut book = Book::new();
        book.set_ended_max(2);
        let mut sequence = 0;
        for n in 1..=4 {
            sequence += 1;
            assert_eq!(book.apply_commit(&filed_commit(n, sequence)), Applied::New);
        }
        for n in 1..=3 {
            sequence += 1;
            assert_eq!(
                book.apply_commit(&cancelled_commit(n, sequence)),
                Applied::New
            );
        }
        let held: Vec<bool> = (1..=4).map(|n| book.get(id(n)).is_some()).collect();
        assert_eq!(held, [false, true, true, true], "1 ended first; 4 is open");
        // A later commit on the dropped incident: a gap from nothing held.
        let mut later = cancelled_commit(1, sequence + 1);
        later.first_version += 1;
        later.version += 1;
        assert_eq!(
            book.apply_commit(&later),
            Applied::Gap {
                incident: id(1),
                held: Position::NEW
            }
        );
        // Read back from the store (filing and cancellation), it is held again, as the most
        // recently ended: the next to leave is 2.
        assert_eq!(book.apply_read_back(&filed_commit(1, 1)), Applied::New);
        assert_eq!(book.apply_read_back(&cancelled_commit(1, 5)), Applied::New);
        let held: Vec<bool> = (1..=4).map(|n| book.get(id(n)).is_some()).collect();
        assert_eq!(held, [true, false, true, true]);
        // A snapshot holds what the book holds.
        let (templates, incidents) = book.parts();
        let copy: Vec<(IncidentId, Held)> = incidents.map(|(id, h)| (*id, h.clone())).collect();
        let restored = Book::from_parts(templates.to_vec(), copy, book.reached_sequence());
        assert_eq!(restored.len(), 3);
    }

    /// A commit read ahead of the subscription is held, but the book does not claim the
    /// commits before it: a snapshot restarts the replay from where the subscription is.
    #[test]
    fn a_commit_read_back_out_of_order_does_not_move_the_reached_sequence() {
        let mut book = Book::new();
        assert_eq!(book.apply_commit(&filed_commit(1, 1)), Applied::New);
        assert_eq!(book.apply_read_back(&filed_commit(2, 9)), Applied::New);
        assert!(book.get(IncidentId(uuid::Uuid::from_u128(2))).is_some());
        assert_eq!(book.reached_sequence(), 1, "sequences 2 to 8 not seen");
        // The subscription reaches it later: already held, and now reached.
        assert_eq!(book.apply_commit(&filed_commit(2, 9)), Applied::AlreadyHeld);
        assert_eq!(book.reached_sequence(), 9);
    }
}
