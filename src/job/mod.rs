//! run-once, backfill and dry-run: what happens between a checked table and
//! the summary.
//!
//! - [`plan`]: what to send (budgets, too-long texts, identical texts),
//!   decided in one place for runs and dry-runs alike;
//! - [`pool`]: the workers, claiming batches in turn;
//! - [`batch`]: one batch after its claim: plan, send, write;
//! - [`send`]: requests, split when rejected or too large;
//! - [`guard`]: replies must fit the column;
//! - [`progress`], [`report`]: what the user sees;
//! - [`watch`]: the same, again and again, as rows become pending;
//! - [`batch_api`]: `--batch-api`, the provider's batch jobs instead of requests.

mod batch;
pub mod batch_api;
mod guard;
mod metrics;
mod plan;
mod pool;
mod progress;
pub mod report;
mod send;
mod units;
pub mod watch;

use crate::checks::{self, Opened};
use crate::config::{Config, Mode};
use crate::db::claims::Taken;
use crate::db::model_records::{Models, Stamp};
use crate::db::target::{Selection, Target};
use crate::db::Db;
use crate::error::Result;
use crate::provider;
use crate::signals::Stop;
use plan::Planner;
use report::{DryRunReport, Report};
use std::sync::Arc;
use units::PlanRow;

/// Connect, check the table and run the loop (or the dry-run). Errors
/// before the loop (configuration, connection) are returned; errors inside
/// it end the loop and are reported with the work done so far.
pub fn run(cfg: &Config, stop: &Stop) -> Result<Report> {
    let Opened {
        cfg,
        mut db,
        target,
        state,
    } = checks::open(cfg)?;
    let cfg = &cfg;
    let provider = provider::build(&cfg.provider)?;
    if cfg.mode == Mode::DryRun {
        // With batch jobs, the budgets count those in flight.
        let in_flight = match cfg.provider.batch_api && state.current {
            true => Some(target.in_flight(db.client())?),
            false => None,
        };
        let shape = match in_flight {
            Some(f) => batch_api::shape(cfg, f.tokens),
            None => plan::Shape::of(cfg),
        };
        let planner = Planner::new(shape, provider.counter, true)?;
        let mut report = dry_run(cfg, &mut db, &target, state, &planner)?;
        if cfg.provider.batch_api {
            report.jobs_in_flight = Some(in_flight.map_or(0, |f| f.jobs));
        }
        return Ok(Report::DryRun(report));
    }
    let (models, guarded) = prepare(cfg, &mut db, &target, state, provider.embedder)?;
    if cfg.provider.batch_api {
        let report = batch_api::run(cfg, &mut db, &target, &models, provider.counter, stop);
        return Ok(Report::Run(report));
    }
    let planner = Planner::new(plan::Shape::of(cfg), provider.counter, false)?;
    let report = pool::run(cfg, &mut db, &target, guarded, planner, &models, stop);
    if cfg.reembed.is_some() && report.stop_reason == report::StopReason::Drained {
        // Every vector is the current model's now: it becomes the baseline.
        if db.in_transaction(|tx| target.settle_models(tx, &models))? {
            crate::info!(
                "all vectors of {} are from {} now",
                target.table,
                models.current
            );
        }
    }
    Ok(Report::Run(report))
}

/// What a run (or a watch) does before its first claim: the state schema
/// (created, or an earlier version's adopted), the model records, and the
/// provider behind the guard that replies fit the column.
fn prepare(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    state: crate::db::state::StateSchema,
    embedder: Arc<dyn provider::Embedder>,
) -> Result<(Models, Arc<dyn provider::Embedder>)> {
    state.ensure(db, &cfg.state_schema)?;
    if state.exists {
        target.adopt_legacy_state(db, &cfg.state_schema)?;
    }
    let stamp = Stamp::of(&cfg.provider, target);
    let models = db.in_transaction(|tx| target.models(tx, stamp))?;
    if !models.is_baseline && cfg.reembed.is_none() {
        crate::debug!(
            "the table's vectors were first made by another model than {}; `backfill --reembed` replaces them",
            models.current
        );
    }
    let guarded: Arc<dyn provider::Embedder> =
        Arc::new(guard::DimensionGuard::new(cfg, target, embedder));
    Ok((models, guarded))
}

/// The run's claim loop and plan, read-only: no claims, no API call, no
/// write; each batch is taken as written once planned.
fn dry_run(
    cfg: &Config,
    db: &mut Db,
    target: &Target,
    state: crate::db::state::StateSchema,
    planner: &Planner,
) -> Result<DryRunReport> {
    let sel = Selection {
        skip_failed: !cfg.retry_failed && state.exists,
        max_attempts: cfg.budget.max_attempts as i32,
        skip_claimed: state.claims,
        skip_batched: state.current,
        reembed: None,
    };
    let pending = target.count_pending(db.client())?;
    let failed = target.count_failed(db.client(), state.exists)?;
    let mut tx = db.read_only()?;
    let mut cursor: Option<String> = None;
    let mut report = DryRunReport {
        command: "dry-run",
        table: target.table.clone(),
        model: cfg.provider.model.clone(),
        pending,
        failed,
        would_embed: 0,
        chunks: target.chunks.as_ref().map(|_| 0),
        truncated: 0,
        too_long: 0,
        estimated_tokens: 0,
        tokens_exact: planner.counter().is_exact(),
        estimated_cost_usd: None,
        jobs_in_flight: None,
        sample_ids: Vec::new(),
    };
    for seq in 0.. {
        let Ok(limit) = planner.claim_limit() else {
            break;
        };
        let Taken { ids, .. } = target.claim(&mut tx, cursor.as_deref(), limit, &sel, None)?;
        let Some(last) = ids.last() else { break };
        cursor = Some(last.clone());
        planner.took(ids.len());
        let rows = target.read(&mut tx, &ids, &sel)?;
        planner.gave_back(ids.len() - rows.len());
        let units = planner.units(&rows);
        let plan = planner.plan(seq, &units);
        // The units that would get a vector, and the rows they are of.
        let mut embedded: Vec<usize> = plan.send.iter().map(|i| i.row).collect();
        embedded.extend(plan.same_text.values().flatten());
        embedded.extend(plan.copy.iter().map(|(i, _)| *i));
        embedded.sort_unstable();
        let mut embedded_rows: Vec<usize> = embedded.iter().map(|&i| units[i].row).collect();
        embedded_rows.dedup();
        for &r in embedded_rows
            .iter()
            .take(10 - report.sample_ids.len().min(10))
        {
            report.sample_ids.push(rows[r].id.clone());
        }
        report.would_embed += embedded_rows.len() as u64;
        if let Some(chunks) = &mut report.chunks {
            *chunks += embedded.len() as u64;
        }
        report.truncated += plan.truncated;
        report.too_long += plan.too_long.len() as u64;
        report.estimated_tokens += plan.tokens();
        let written: Vec<&str> = embedded.iter().map(|&i| units[i].id()).collect();
        planner.settle(seq, &written);
        if plan.stop.is_some() {
            break;
        }
    }
    tx.rollback()?;
    report.estimated_cost_usd = cfg
        .provider
        .price()
        .map(|p| report.estimated_tokens as f64 * p / 1_000_000.0);
    Ok(report)
}
