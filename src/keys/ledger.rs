//! The usage ledger: durable per-key token and request counts in `keys.db`.
//!
//! Owns the ledger's rules (rows per key and UTC minute, day and month bounds, when to write and
//! compact) and the [`LedgerWriter`] that the gateway calls from the request path; the rows
//! themselves are the store backend's (`keys::backend::LedgerBackend`; SQLite: the `usage`
//! table). Never blocks the request path: [`LedgerWriter::record`] is a `try_send` on a bounded
//! channel (full → the event is dropped and counted, never awaited). Never stores prompts,
//! completions or secrets: only key ids and counts.
//!
//! Rows are per key and UTC minute (`bucket_ms = 60_000`); [`Ledger::compact`] folds whole UTC
//! days of minute rows into one day row (`bucket_ms = 86_400_000`) starting at midnight, so a
//! range query over `[day or month start, end)` stays exact whatever the granularity.
//!
//! Durability bound: a background task aggregates events in memory and writes them in one
//! transaction every [`LedgerOptions::flush_every`] (250 ms). A `kill -9` loses what was not
//! yet committed: at most one flush interval plus the time of one write, measured well under
//! 1 s (`tests::sigkill_loses_at_most_the_last_second` SIGKILLs a child process that is
//! recording and checks it). `synchronous=NORMAL` in WAL mode survives a process crash; a power
//! loss may also lose the last commits.

use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

pub use super::spool::SPOOL_FILE;
use super::spool::{new_batch_id, Spool};
use super::store::{KeyStore, StoreConfig};
pub use super::types::{KeyUsage, UsageTotals, DAY_MS, MINUTE_MS};
use super::types::{MinuteRows, StoreError};
use crate::policy::limits::utc_day_month_bounds;

/// One finished (or aborted) request's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub key_id: Arc<str>,
    /// When the request ended (its row is the UTC minute containing this).
    pub at: SystemTime,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The counts are the gateway's estimate (the upstream reported no usage).
    pub estimated: bool,
}

/// The ledger over one store connection (blocking; use from the blocking pool or the CLI).
#[derive(Debug)]
pub struct Ledger {
    store: KeyStore,
    /// Where usage waits while a shared store is unreachable (see [`Ledger::write_shared`]).
    spool: Option<Spool>,
}

fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Ledger {
    /// Opens `<state_dir>/keys.db` (creating and migrating it like [`KeyStore::open`]).
    pub fn open(state_dir: &Path) -> Result<Ledger, StoreError> {
        Ledger::from_store(KeyStore::open(state_dir)?)
    }

    /// Opens the ledger of the store `store` names.
    pub fn open_in(state_dir: &Path, store: &StoreConfig) -> Result<Ledger, StoreError> {
        Ledger::from_store(KeyStore::open_in(state_dir, store)?)
    }

    /// Uses an open store's connection, readied for frequent small commits (SQLite:
    /// `synchronous=NORMAL`, so a commit survives a process crash without an fsync per batch).
    pub fn from_store(mut store: KeyStore) -> Result<Ledger, StoreError> {
        store.backend_mut().prepare_ledger()?;
        Ok(Ledger { store, spool: None })
    }

    /// Spools usage at `path` whenever the store cannot take it (a shared store's outage);
    /// what an earlier run spooled is sent first.
    pub fn attach_spool(&mut self, path: &std::path::Path) -> Result<u64, StoreError> {
        let spool = Spool::open(path)?;
        let rows = spool.row_count()?;
        self.spool = Some(spool);
        Ok(rows)
    }

    /// Rows waiting in the spool (0 without one).
    pub fn spooled_rows(&self) -> u64 {
        self.spool
            .as_ref()
            .and_then(|s| s.row_count().ok())
            .unwrap_or(0)
    }

    /// A write through the spool: sends what the spool holds (oldest first, each batch under
    /// its id, so a batch whose answer was lost is not counted twice), then `rows` as a new
    /// batch. When the store fails, the rows go to the spool (durable) instead.
    pub fn write_shared(&mut self, rows: MinuteRows) -> SharedWrite {
        let Some(spool) = self.spool.as_mut() else {
            return match self.store.backend_mut().add_usage(&rows) {
                Ok(()) => SharedWrite::Written {
                    requests: requests_of(&rows),
                },
                Err(e) => SharedWrite::Failed(e, rows),
            };
        };
        let backend = self.store.backend_mut();
        let mut requests = 0;
        loop {
            match spool.oldest_for_send() {
                Ok(None) => break,
                Ok(Some(b)) => match backend.add_usage_batch(&b.id, &b.rows) {
                    Ok(_) => {
                        if let Err(e) = spool.remove(&b.id) {
                            // Sent but still spooled: resending it is harmless (same id).
                            return SharedWrite::Failed(e, rows);
                        }
                        requests += requests_of(&b.rows);
                    }
                    Err(e) => {
                        if rows.is_empty() {
                            return SharedWrite::Spooled {
                                error: e,
                                dropped: 0,
                                drained: requests,
                            };
                        }
                        return match spool.add_unsent(&rows) {
                            Ok(dropped) => SharedWrite::Spooled {
                                error: e,
                                dropped,
                                drained: requests,
                            },
                            Err(se) => {
                                tracing::error!(error = %se, "usage spool unwritable; keeping usage in memory");
                                SharedWrite::Failed(e, rows)
                            }
                        };
                    }
                },
                Err(e) => return SharedWrite::Failed(e, rows),
            }
        }
        if rows.is_empty() {
            return SharedWrite::Written { requests };
        }
        let id = new_batch_id();
        match backend.add_usage_batch(&id, &rows) {
            Ok(_) => SharedWrite::Written {
                requests: requests + requests_of(&rows),
            },
            Err(e) => match spool.add_sent(&id, &rows) {
                Ok(dropped) => SharedWrite::Spooled {
                    error: e,
                    dropped,
                    drained: requests,
                },
                Err(se) => {
                    tracing::error!(error = %se, "usage spool unwritable; keeping usage in memory");
                    SharedWrite::Failed(e, rows)
                }
            },
        }
    }

    #[cfg(test)]
    pub(crate) fn store(&self) -> &KeyStore {
        &self.store
    }

    /// Adds `rows` (already summed per key and minute) in one transaction.
    fn write_rows(&mut self, rows: &MinuteRows) -> Result<(), StoreError> {
        self.store.backend_mut().add_usage(rows)
    }

    /// Writes `events` in one transaction (the writer task's batch; also handy for tests and
    /// imports).
    pub fn write(&mut self, events: &[UsageEvent]) -> Result<(), StoreError> {
        let mut rows = HashMap::new();
        for e in events {
            aggregate(&mut rows, e);
        }
        self.write_rows(&rows)
    }

    /// Writes `events` as the batch `batch_id`, once: a shared store skips an id it has
    /// applied (a local one has no ids and always writes). Returns whether it was written now.
    pub fn write_batch(
        &mut self,
        batch_id: &str,
        events: &[UsageEvent],
    ) -> Result<bool, StoreError> {
        let mut rows = HashMap::new();
        for e in events {
            aggregate(&mut rows, e);
        }
        self.store.backend_mut().add_usage_batch(batch_id, &rows)
    }

    /// `key_id`'s usage in the UTC day and month containing `now`, and in total.
    pub fn usage(&self, key_id: &str, now: SystemTime) -> Result<KeyUsage, StoreError> {
        let (d0, d1, m0, m1) = utc_day_month_bounds(now);
        let (d0, d1, m0, m1) = (d0 as i64, d1 as i64, m0 as i64, m1 as i64);
        let b = self.store.backend();
        Ok(KeyUsage {
            today: b.sum_usage(key_id, d0, d1)?,
            this_month: b.sum_usage(key_id, m0, m1)?,
            total: b.sum_usage(key_id, i64::MIN, i64::MAX)?,
        })
    }

    /// Tokens (prompt + completion) of every key with usage this UTC month, as
    /// `(key_id, today, this_month)`: what the gateway passes to
    /// [`crate::policy::limits::Limiter::seed_usage`] at startup.
    pub fn period_tokens(&self, now: SystemTime) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let (d0, d1, m0, m1) = utc_day_month_bounds(now);
        self.store
            .backend()
            .period_tokens((d0 as i64, d1 as i64), (m0 as i64, m1 as i64))
    }

    /// Folds the minute rows of every whole UTC day before the day containing `older_than`
    /// into one row per key and day, in one transaction. Sums are unchanged, so day, month and
    /// total usage stay exact. Returns the number of minute rows folded.
    pub fn compact(&mut self, older_than: SystemTime) -> Result<usize, StoreError> {
        let cutoff = ms_of(older_than).div_euclid(DAY_MS) * DAY_MS;
        self.store.backend_mut().compact_usage(cutoff)
    }

    /// Records this appliance (`id`) as alive and returns how many are (see
    /// [`APPLIANCE_WINDOW`]).
    pub fn heartbeat(&mut self, id: &str) -> Result<u32, StoreError> {
        let window = APPLIANCE_WINDOW.as_millis() as i64;
        self.store
            .backend_mut()
            .heartbeat(id, ms_of(SystemTime::now()), window)
    }

    /// Renews and tops up `asks` in one transaction (see [`LeaseAsk`]): per ask, the tokens
    /// granted in total and what the store had left after granting.
    pub fn lease_budgets(
        &mut self,
        appliance: &str,
        asks: &[LeaseAsk],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let expiry = LEASE_EXPIRY.as_millis() as i64;
        self.store
            .backend_mut()
            .lease_budgets(appliance, ms_of(SystemTime::now()), expiry, asks)
    }

    /// Number of rows (tests and `doctor`).
    pub fn row_count(&self) -> Result<u64, StoreError> {
        self.store.backend().usage_row_count()
    }
}

/// What [`Ledger::write_shared`] did.
#[derive(Debug)]
pub enum SharedWrite {
    /// Everything is in the store (`requests`: the requests these rows count).
    Written { requests: u64 },
    /// The store failed; the rows are in the spool (`dropped` rows did not fit; `drained`
    /// requests from the spool reached the store first).
    Spooled {
        error: StoreError,
        dropped: u64,
        drained: u64,
    },
    /// The store failed and the spool too (or there is none): the caller keeps the rows.
    Failed(StoreError, MinuteRows),
}

fn requests_of(rows: &MinuteRows) -> u64 {
    rows.values().map(|t| t.requests).sum()
}

/// Adds `e` to its (key, minute) row.
fn aggregate(rows: &mut MinuteRows, e: &UsageEvent) {
    let start = ms_of(e.at).div_euclid(MINUTE_MS) * MINUTE_MS;
    rows.entry((e.key_id.clone(), start))
        .or_default()
        .add(&UsageTotals {
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            requests: 1,
            estimated: u64::from(e.estimated),
        });
}

/// Writer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Events the channel holds; when full, [`LedgerWriter::record`] drops and counts.
    pub queue: usize,
    /// How often pending events are written (one transaction each time).
    pub flush_every: Duration,
    /// How often the writer task compacts: minute rows of whole UTC days older than
    /// `keep_minute_rows` fold into one row per key and day (sums unchanged). The first
    /// compaction runs at the first flush after start.
    pub compact_every: Duration,
    /// Minute rows younger than this are kept as they are.
    pub keep_minute_rows: Duration,
    /// The spool file of a shared store (`None`: a local store, no spool).
    pub spool: Option<PathBuf>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            // 250 ms of 10k requests/s with room to spare; an event is ~64 bytes.
            queue: 16_384,
            flush_every: Duration::from_millis(250),
            // Minute rows: ≤ 1440 per key and day; folding twice a day keeps the table at
            // about two days of minute rows plus one row per key and older day.
            compact_every: Duration::from_secs(12 * 3600),
            keep_minute_rows: Duration::from_secs(2 * 86_400),
            spool: None,
        }
    }
}

/// Counters for metrics and logs.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Events accepted by `record`.
    pub recorded: AtomicU64,
    /// Events refused because the queue was full (or the task had ended).
    pub dropped: AtomicU64,
    /// Events committed to the database.
    pub written: AtomicU64,
    /// Failed write transactions (their events are retried with the next batch).
    pub write_errors: AtomicU64,
    /// Minute rows folded into day rows by the scheduled compaction.
    pub compacted: AtomicU64,
    /// Requests whose usage went to the local spool (a shared store was unreachable).
    pub spooled: AtomicU64,
    /// Spool rows dropped because the spool was full.
    pub spool_dropped: AtomicU64,
    /// Rows waiting in the spool.
    pub spool_rows: AtomicU64,
    /// Since when (ms since the epoch) the store refuses writes; 0 while it takes them.
    pub failing_since_ms: AtomicI64,
    /// The last write error while failing (for `status` and `doctor`).
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Tokens per key this process committed to a shared store directly (not via the spool)
    /// in the current UTC day and month: what the budget leases subtract from what they hold.
    flushed: std::sync::Mutex<HashMap<Arc<str>, FlushedKey>>,
}

/// Tokens of one key committed in the UTC day and month starting at `day`/`month` (ms).
#[derive(Debug, Default, Clone, Copy)]
struct FlushedKey {
    day: i64,
    day_tokens: u64,
    month: i64,
    month_tokens: u64,
}

impl LedgerStats {
    /// Counts `rows` (committed) into the per-key day and month sums.
    fn note_flushed(&self, rows: &MinuteRows) {
        let mut map = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        for ((key, start), t) in rows {
            let (d0, _, m0, _) =
                utc_day_month_bounds(UNIX_EPOCH + Duration::from_millis((*start).max(0) as u64));
            let (d0, m0) = (d0 as i64, m0 as i64);
            let tokens = t.prompt_tokens.saturating_add(t.completion_tokens);
            let f = map.entry(key.clone()).or_default();
            if d0 > f.day {
                (f.day, f.day_tokens) = (d0, 0);
            }
            if d0 == f.day {
                f.day_tokens = f.day_tokens.saturating_add(tokens);
            }
            if m0 > f.month {
                (f.month, f.month_tokens) = (m0, 0);
            }
            if m0 == f.month {
                f.month_tokens = f.month_tokens.saturating_add(tokens);
            }
        }
    }

    /// Tokens of `key_id` this process committed in the day or month starting at
    /// `period_start` (ms), by [`Self::note_flushed`].
    pub fn flushed(&self, key_id: &str, period_start: i64) -> u64 {
        let map = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key_id).map_or(0, |f| {
            if f.day == period_start {
                f.day_tokens
            } else if f.month == period_start {
                f.month_tokens
            } else {
                0
            }
        })
    }

    /// Since when the store has refused writes, and the last error; `None` while it takes them.
    pub fn degraded(&self) -> Option<(SystemTime, String)> {
        let ms = self.failing_since_ms.load(Ordering::Acquire);
        (ms != 0).then(|| {
            (
                super::backend::from_ms(ms),
                self.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default(),
            )
        })
    }

    fn set_failing(&self, e: Option<&StoreError>) {
        match e {
            Some(e) => {
                let _ = self.failing_since_ms.compare_exchange(
                    0,
                    ms_of(SystemTime::now()).max(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            None => {
                self.failing_since_ms.store(0, Ordering::Release);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct LedgerWriter {
    tx: mpsc::Sender<UsageEvent>,
    stats: Arc<LedgerStats>,
}

/// The background writer task. It ends, after a final write, once every [`LedgerWriter`] clone
/// has been dropped; await [`LedgerTask::finished`] on shutdown.
#[derive(Debug)]
pub struct LedgerTask {
    handle: tokio::task::JoinHandle<()>,
}

impl LedgerTask {
    /// Waits for the final write (after every writer was dropped).
    pub async fn finished(self) {
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "usage ledger task failed");
        }
    }
}

impl LedgerWriter {
    /// Spawns the writer task on the current tokio runtime.
    pub fn start(mut ledger: Ledger, opts: LedgerOptions) -> (LedgerWriter, LedgerTask) {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let stats = Arc::new(LedgerStats::default());
        if let Some(path) = &opts.spool {
            match ledger.attach_spool(path) {
                Ok(rows) => {
                    stats.spool_rows.store(rows, Ordering::Release);
                    if rows > 0 {
                        tracing::info!(rows, spool = %path.display(), "usage spool holds rows from before; sending them to the store");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot open the usage spool; usage waits in memory while the store is unreachable")
                }
            }
        }
        let handle = tokio::spawn(run(ledger, rx, opts, stats.clone()));
        (LedgerWriter { tx, stats }, LedgerTask { handle })
    }

    /// Queues `ev` for the next write; never blocks. Returns `false` (and counts a drop) when
    /// the queue is full or the task has ended.
    pub fn record(&self, ev: UsageEvent) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.stats.recorded.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// The counters, to keep after the writer moved into the gateway (status).
    pub fn stats_handle(&self) -> Arc<LedgerStats> {
        self.stats.clone()
    }
}

/// The task: drain the channel into per-(key, minute) sums; every `flush_every` write them in
/// one transaction on the blocking pool. A failed write keeps its sums for the next round (they
/// are bounded by keys × minutes, not by events).
async fn run(
    ledger: Ledger,
    mut rx: mpsc::Receiver<UsageEvent>,
    opts: LedgerOptions,
    stats: Arc<LedgerStats>,
) {
    let shared = opts.spool.is_some();
    let mut ledger = Some(ledger);
    let mut pending = MinuteRows::new();
    let mut events = 0u64;
    let mut failing = false;
    let mut last_compaction: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(opts.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let closed = tokio::select! {
            ev = rx.recv() => match ev {
                Some(e) => {
                    aggregate(&mut pending, &e);
                    events += 1;
                    while let Ok(e) = rx.try_recv() {
                        aggregate(&mut pending, &e);
                        events += 1;
                    }
                    continue;
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        if shared && (!pending.is_empty() || stats.spool_rows.load(Ordering::Acquire) > 0) {
            let rows = std::mem::take(&mut pending);
            let sent = rows.clone();
            let Some((result, spool_rows)) = on_blocking_pool(&mut ledger, "write", move |l| {
                let r = l.write_shared(rows);
                (r, l.spooled_rows())
            })
            .await
            else {
                return;
            };
            stats.spool_rows.store(spool_rows, Ordering::Release);
            match result {
                SharedWrite::Written { requests } => {
                    stats.note_flushed(&sent);
                    stats.written.fetch_add(requests, Ordering::Relaxed);
                    events = 0;
                    stats.set_failing(None);
                    if failing {
                        tracing::info!("usage store writable again; the spool is sent");
                        failing = false;
                    }
                }
                SharedWrite::Spooled {
                    error,
                    dropped,
                    drained,
                } => {
                    stats.written.fetch_add(drained, Ordering::Relaxed);
                    stats.spooled.fetch_add(events, Ordering::Relaxed);
                    events = 0;
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    stats.spool_dropped.fetch_add(dropped, Ordering::Relaxed);
                    if dropped > 0 {
                        tracing::error!(rows = dropped, "usage spool full: usage dropped");
                    }
                    stats.set_failing(Some(&error));
                    if !failing {
                        tracing::error!(error = %error, "cannot write the usage store; spooling usage locally and retrying");
                        failing = true;
                    }
                }
                SharedWrite::Failed(error, rows) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    stats.set_failing(Some(&error));
                    if !failing {
                        tracing::error!(error = %error, "cannot write the usage ledger; retrying");
                        failing = true;
                    }
                    for (k, t) in rows {
                        pending.entry(k).or_default().add(&t);
                    }
                }
            }
        } else if !pending.is_empty() {
            let rows = std::mem::take(&mut pending);
            let Some((rows, result)) = on_blocking_pool(&mut ledger, "write", move |l| {
                let r = l.write_rows(&rows);
                (rows, r)
            })
            .await
            else {
                return;
            };
            match result {
                Ok(()) => {
                    stats.written.fetch_add(events, Ordering::Relaxed);
                    events = 0;
                    stats.set_failing(None);
                    if failing {
                        tracing::info!("usage ledger writable again");
                        failing = false;
                    }
                }
                Err(e) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    stats.set_failing(Some(&e));
                    if !failing {
                        tracing::error!(error = %e, "cannot write the usage ledger; retrying");
                        failing = true;
                    }
                    for (k, t) in rows {
                        pending.entry(k).or_default().add(&t);
                    }
                }
            }
        }
        if !closed && last_compaction.is_none_or(|t| t.elapsed() >= opts.compact_every) {
            last_compaction = Some(std::time::Instant::now());
            let older_than = SystemTime::now()
                .checked_sub(opts.keep_minute_rows)
                .unwrap_or(UNIX_EPOCH);
            let Some(r) =
                on_blocking_pool(&mut ledger, "compaction", move |l| l.compact(older_than)).await
            else {
                return;
            };
            match r {
                Ok(n) => {
                    stats.compacted.fetch_add(n as u64, Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!(minute_rows = n, "usage ledger compacted");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "usage ledger compaction failed; retrying at the next interval")
                }
            }
        }
        if closed {
            if !pending.is_empty() {
                tracing::error!(
                    rows = pending.len(),
                    "usage ledger: could not write the last usage before shutdown"
                );
            }
            return;
        }
    }
}

/// Runs `f` on the ledger in `slot` on the blocking pool and puts the ledger back. `None` (the
/// task must end) when the slot is empty or the blocking task failed (logged, naming `what`).
async fn on_blocking_pool<T: Send + 'static>(
    slot: &mut Option<Ledger>,
    what: &str,
    f: impl FnOnce(&mut Ledger) -> T + Send + 'static,
) -> Option<T> {
    let mut l = slot.take()?;
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut l);
        (l, r)
    })
    .await
    {
        Ok((l, r)) => {
            *slot = Some(l);
            Some(r)
        }
        Err(e) => {
            tracing::error!(error = %e, "usage ledger {what} task failed");
            None
        }
    }
}

/// An appliance whose last heartbeat (one per [`BUDGET_SYNC`]) is older than this no longer
/// takes a share of the keys' rate limits.
pub const APPLIANCE_WINDOW: Duration = Duration::from_secs(5);

/// The file naming this appliance in the shared store (random, kept across restarts).
pub const APPLIANCE_ID_FILE: &str = "appliance.id";

/// This appliance's id (`<state_dir>/appliance.id`, created on first use).
fn appliance_id(state_dir: &Path) -> String {
    let path = state_dir.join(APPLIANCE_ID_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return s.trim().to_string();
        }
    }
    let id = new_batch_id();
    if let Err(e) = crate::fsutil::write_atomic(&path, format!("{id}\n").as_bytes(), 0o600) {
        tracing::warn!(error = %e, file = %path.display(), "cannot keep the appliance id; using a new one per start");
    }
    id
}

/// How often an appliance on a shared store heartbeats and renews its budget leases.
pub const BUDGET_SYNC: Duration = Duration::from_secs(1);

/// How long a budget lease holds in the store without renewal (renewed every [`BUDGET_SYNC`]).
/// An appliance that dies without returning its lease frees it after this; one that cannot
/// reach the store stops spending it [`LEASE_MARGIN`] earlier.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(10);

/// How much earlier than the store the appliance itself considers a lease void (covers the
/// time of the lease transaction and clock differences between appliances up to this).
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// One key's lease request in [`Ledger::lease_budgets`] (one transaction for all keys).
///
/// The store locks the key (an advisory lock per key id), reads `used` (the key's tokens in
/// `period` in the shared ledger, every appliance's flushed usage) and `others` (the other
/// appliances' unexpired leases, each `granted - flushed`: unspent, or spent but not yet in the
/// ledger), and grants `min(want, max(left / share, floor), left)` more, with
/// `left = budget - used - others - (granted - flushed)`. So `used + Σ held ≤ budget` at every
/// grant, and no appliance spends beyond what it was granted: the budget is exceeded by at most
/// what requests in flight produce past their reservation before they are stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub key_id: String,
    /// The budget's UTC day or month, `[start, end)` in ms since the epoch.
    pub period: (i64, i64),
    /// The key's budget in tokens.
    pub budget: u64,
    /// Tokens this appliance was granted in the period so far (its lease, cumulative).
    pub granted: u64,
    /// Tokens of those this appliance has committed to the shared ledger since.
    pub flushed: u64,
    /// Tokens more it would like (0: renew only).
    pub want: u64,
    /// Appliances alive (a grant takes at most `left / share`, unless that is below `floor`).
    pub share: u32,
    /// A grant may take `floor` (one default reservation) even when that exceeds its share.
    pub floor: u64,
}

/// What a budget sync needs besides the limiter: the key set (whose keys have budgets) and the
/// ledger writer's counters (what this appliance already committed).
#[derive(Clone)]
pub struct BudgetSync {
    pub limiter: Arc<std::sync::Mutex<crate::policy::limits::Limiter>>,
    pub keys: Arc<super::watch::Keys>,
    pub ledger: Arc<LedgerStats>,
    pub state_dir: PathBuf,
    pub store: StoreConfig,
}

/// The lease an appliance aims to hold for a key: a quarter of the budget's per-appliance share,
/// at least `floor` (one default reservation), at most the budget.
fn lease_target(budget: u64, share: u32, floor: u64) -> u64 {
    (budget / (4 * u64::from(share.max(1))))
        .max(floor)
        .min(budget)
}

/// Keeps a shared store's budgets global with leases: every [`BUDGET_SYNC`] it heartbeats (the
/// live appliances share RPM, TPM and concurrency) and, in one transaction, renews this
/// appliance's lease of every budgeted key and tops up those that run low (below half of
/// [`lease_target`]). The request path admits against the local lease only (no round trip).
/// While the store is unreachable the leases are spent as they are until they lapse
/// ([`LEASE_EXPIRY`] − [`LEASE_MARGIN`] after the last renewal); then budgeted requests are
/// refused (429) until the store is back. On stop the unspent leases are returned.
pub async fn sync_budgets(sync: BudgetSync, mut stop: tokio::sync::watch::Receiver<bool>) {
    use crate::policy::limits::period_bounds;
    sync.limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_leased(true);
    let mut ledger: Option<Ledger> = None;
    let id = appliance_id(&sync.state_dir);
    let mut share = 0u32;
    // The flushed count of each (key, period start) when its lease began: only what was flushed
    // since counts against the lease.
    let mut flushed_base: HashMap<(String, i64), u64> = HashMap::new();
    // What each key had spent (and had in flight) at the last sync: a key that spent more than
    // its target in one second gets twice that as its next target.
    let mut last_spent: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(BUDGET_SYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    stopping = changed.is_err() || *stop.borrow();
                    if !stopping { continue; }
                }
            }
        }
        let wall = SystemTime::now();
        let started = std::time::Instant::now();
        let budgets = sync.keys.current().budgets();
        let asks: Vec<(LeaseAsk, crate::policy::BudgetPeriod)> = {
            let limiter = sync.limiter.lock().unwrap_or_else(|p| p.into_inner());
            let floor = u64::from(limiter.default_max_tokens()) * 2;
            budgets
                .iter()
                .map(|(key_id, b)| {
                    let st = limiter.lease_state(key_id, b.period, wall);
                    let (p0, p1) = period_bounds(b.period, wall);
                    let (p0, p1) = (p0 as i64, p1 as i64);
                    let now_flushed = sync.ledger.flushed(key_id, p0);
                    let base = *flushed_base
                        .entry((key_id.clone(), p0))
                        .or_insert(if st.granted == 0 { now_flushed } else { 0 });
                    let flushed = now_flushed.saturating_sub(base).min(st.spent);
                    let unspent = st.granted.saturating_sub(st.spent + st.in_flight);
                    let now_spent = st.spent + st.in_flight;
                    let last = last_spent
                        .insert(key_id.clone(), now_spent)
                        .unwrap_or(now_spent);
                    let rate = now_spent.saturating_sub(last);
                    let target = lease_target(b.tokens, share.max(1), floor)
                        .max(rate.saturating_mul(2))
                        .min(b.tokens);
                    let (granted, want) = if stopping {
                        // Return what is unspent; keep what is in flight.
                        (st.spent + st.in_flight, 0)
                    } else if unspent < target / 2 + 1 {
                        (st.granted, target - unspent.min(target))
                    } else {
                        (st.granted, 0)
                    };
                    let ask = LeaseAsk {
                        key_id: key_id.clone(),
                        period: (p0, p1),
                        budget: b.tokens,
                        granted,
                        flushed,
                        want,
                        share: share.max(1),
                        floor,
                    };
                    (ask, b.period)
                })
                .collect()
        };
        let current: std::collections::HashSet<(&str, i64)> = asks
            .iter()
            .map(|(a, _)| (a.key_id.as_str(), a.period.0))
            .collect();
        flushed_base.retain(|(k, p0), _| current.contains(&(k.as_str(), *p0)));
        let ids: std::collections::HashSet<&str> = current.iter().map(|(k, _)| *k).collect();
        last_spent.retain(|k, _| ids.contains(k.as_str()));
        let (dir, cfg, taken, me) = (
            sync.state_dir.clone(),
            sync.store.clone(),
            ledger.take(),
            id.clone(),
        );
        let plain: Vec<LeaseAsk> = asks.iter().map(|(a, _)| a.clone()).collect();
        let joined = tokio::task::spawn_blocking(move || {
            let mut l = match taken {
                Some(l) => l,
                None => match Ledger::open_in(&dir, &cfg) {
                    Ok(l) => l,
                    Err(_) => return (None, None),
                },
            };
            let live = match l.heartbeat(&me) {
                Ok(n) => n,
                Err(_) => return (None, None),
            };
            match l.lease_budgets(&me, &plain) {
                Ok(granted) => (Some(l), Some((granted, live))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the budget leases; spending the current ones until they lapse");
                    (None, None)
                }
            }
        })
        .await;
        if let Ok((kept, result)) = joined {
            ledger = kept;
            if let Some((granted, live)) = result {
                let mut limiter = sync.limiter.lock().unwrap_or_else(|p| p.into_inner());
                if live != share {
                    tracing::info!(appliances = live, "live appliances on the shared store: each enforces 1/{live} of every key's RPM, TPM and concurrency");
                    share = live;
                    limiter.set_share(live);
                }
                for ((ask, period), (total, left)) in asks.iter().zip(granted) {
                    limiter.set_lease(
                        &ask.key_id,
                        *period,
                        crate::policy::limits::Grant {
                            granted: total,
                            exhausted: left == 0,
                            valid_for: LEASE_EXPIRY - LEASE_MARGIN,
                        },
                        started,
                        wall,
                    );
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
