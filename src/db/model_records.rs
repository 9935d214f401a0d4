//! Which model made a table's vectors: each table's baseline model (the
//! model of its first run, `<state>.models`) and the rows another model
//! made (`<state>.vectors`), so a table that keeps its model costs no
//! bookkeeping per row. `verify` warns from it; `backfill --reembed` uses it.

use super::target::{Quoted, Reembedding, Target};
use crate::config::ProviderConfig;
use crate::config::Reembed;
use crate::error::Result;
use crate::models::known_model;
use postgres::types::Type;
use postgres::GenericClient;

/// Which model made a vector: its name (without `openai/`) and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stamp {
    pub model: String,
    pub dimensions: i32,
}

impl Stamp {
    /// The model this run embeds with, as the state tables record it.
    pub fn of(provider: &ProviderConfig, target: &Target) -> Stamp {
        let model = known_model(&provider.model).map_or(provider.model.as_str(), |m| m.name);
        let dimensions = target
            .dimensions
            .or_else(|| provider.expected_dimensions())
            .unwrap_or(0);
        Stamp {
            model: model.to_string(),
            dimensions: dimensions as i32,
        }
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} dimensions)", self.model, self.dimensions)
    }
}

/// What a run knows, from its start, about which models made the table's
/// vectors. The table has a baseline model (the first autoembed ran with);
/// only rows another model made are listed, so a table that keeps its
/// model costs no bookkeeping per row.
#[derive(Debug, Clone)]
pub struct Models {
    /// The model of this run.
    pub current: Stamp,
    /// The current model is the baseline: its rows need no record.
    pub is_baseline: bool,
    /// Some rows are listed (another model than the baseline made them).
    pub listed: bool,
}

impl Models {
    /// What `backfill --reembed` (`which`) selects, judged against this run's model.
    pub fn reembedding(&self, which: Reembed) -> Reembedding<'_> {
        Reembedding {
            which,
            model: &self.current.model,
            dimensions: self.current.dimensions,
            model_is_baseline: self.is_baseline,
        }
    }
}

/// How many of a table's vectors each model made.
#[derive(Debug, Clone)]
pub struct ModelCounts {
    /// Vectors by model, most first.
    pub counts: Vec<(Stamp, i64)>,
}

impl Target {
    /// The models of the table's vectors as this run starts; records the
    /// current model as the table's baseline when it has none yet.
    pub fn models(&self, c: &mut impl GenericClient, current: Stamp) -> Result<Models> {
        let state = &self.sql.state;
        c.query_typed(
            &format!(
                "INSERT INTO {state}.models (table_name, model, dimensions) VALUES ($1, $2, $3) \
                 ON CONFLICT (table_name) DO NOTHING"
            ),
            &[
                (&self.key, Type::TEXT),
                (&current.model, Type::TEXT),
                (&current.dimensions, Type::INT4),
            ],
        )?;
        let row = c.query_typed_one(
            &format!(
                "SELECT m.model, m.dimensions, \
                        EXISTS (SELECT 1 FROM {state}.vectors r WHERE r.table_name = $1) \
                 FROM {state}.models m WHERE m.table_name = $1"
            ),
            &[(&self.key, Type::TEXT)],
        )?;
        let baseline = Stamp {
            model: row.get(0),
            dimensions: row.get(1),
        };
        Ok(Models {
            is_baseline: baseline == current,
            current,
            listed: row.get(2),
        })
    }

    /// How many of the table's vectors each model made (`None` before
    /// autoembed's first run on the table).
    pub fn model_counts(&self, c: &mut impl GenericClient) -> Result<Option<ModelCounts>> {
        let Quoted {
            table, id, state, ..
        } = &self.sql;
        let Some(base) = c.query_typed_opt(
            &format!("SELECT model, dimensions FROM {state}.models WHERE table_name = $1"),
            &[(&self.key, Type::TEXT)],
        )?
        else {
            return Ok(None);
        };
        let baseline = Stamp {
            model: base.get(0),
            dimensions: base.get(1),
        };
        let rows = c.query_typed(
            &format!(
                "SELECT coalesce(r.model, $2), coalesce(r.dimensions, $3), count(*) \
                 FROM {table} t LEFT JOIN {state}.vectors r ON r.table_name = $1 AND r.row_id = t.{id}::text \
                 WHERE {embedded} GROUP BY 1, 2 ORDER BY 3 DESC, 1",
                embedded = self.has_vector("t"),
            ),
            &[
                (&self.key, Type::TEXT),
                (&baseline.model, Type::TEXT),
                (&baseline.dimensions, Type::INT4),
            ],
        )?;
        let counts = rows
            .into_iter()
            .map(|r| {
                (
                    Stamp {
                        model: r.get(0),
                        dimensions: r.get(1),
                    },
                    r.get(2),
                )
            })
            .collect();
        Ok(Some(ModelCounts { counts }))
    }

    /// After a `--reembed` that left no vector of another model: the current
    /// model becomes the baseline, and the list of rows is emptied.
    pub fn settle_models(&self, c: &mut impl GenericClient, models: &Models) -> Result<bool> {
        if models.is_baseline {
            return Ok(false);
        }
        let Quoted {
            table, id, state, ..
        } = &self.sql;
        let others: i64 = c
            .query_typed_one(
                &format!(
                    "SELECT count(*) FROM {table} t WHERE {embedded} AND NOT EXISTS (\
                       SELECT 1 FROM {state}.vectors r WHERE r.table_name = $1 \
                       AND r.row_id = t.{id}::text AND r.model = $2 AND r.dimensions = $3)",
                    embedded = self.has_vector("t"),
                ),
                &[
                    (&self.key, Type::TEXT),
                    (&models.current.model, Type::TEXT),
                    (&models.current.dimensions, Type::INT4),
                ],
            )?
            .get(0);
        if others > 0 {
            return Ok(false);
        }
        c.query_typed(
            &format!(
                "WITH m AS (UPDATE {state}.models SET model = $2, dimensions = $3, since = now() \
                            WHERE table_name = $1) \
                 DELETE FROM {state}.vectors WHERE table_name = $1"
            ),
            &[
                (&self.key, Type::TEXT),
                (&models.current.model, Type::TEXT),
                (&models.current.dimensions, Type::INT4),
            ],
        )?;
        Ok(true)
    }
}
