//! What the provider says about a job and about each of its requests:
//! the batch object (status, files, metadata, validation errors) and the
//! result of one line of an output or error file.

use super::INTENT_KEY;
use crate::provider::http::one_line;
use serde_json::Value;

/// Where a job is, as the provider says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Validating,
    InProgress,
    Finalizing,
    Cancelling,
    Completed,
    Expired,
    Cancelled,
    Failed,
}

impl JobStatus {
    fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "validating" => JobStatus::Validating,
            "in_progress" => JobStatus::InProgress,
            "finalizing" => JobStatus::Finalizing,
            "cancelling" => JobStatus::Cancelling,
            "completed" => JobStatus::Completed,
            "expired" => JobStatus::Expired,
            "cancelled" => JobStatus::Cancelled,
            "failed" => JobStatus::Failed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Validating => "validating",
            JobStatus::InProgress => "in_progress",
            JobStatus::Finalizing => "finalizing",
            JobStatus::Cancelling => "cancelling",
            JobStatus::Completed => "completed",
            JobStatus::Expired => "expired",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Failed => "failed",
        }
    }

    /// Still working: nothing to collect yet.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            JobStatus::Validating
                | JobStatus::InProgress
                | JobStatus::Finalizing
                | JobStatus::Cancelling
        )
    }
}

/// A job as the provider describes it.
#[derive(Debug, Clone)]
pub struct RemoteJob {
    pub id: String,
    pub status: JobStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// The intent autoembed put in its metadata.
    pub intent: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Why a failed job failed (validation errors), in one line.
    pub errors: Option<String>,
}

impl RemoteJob {
    pub(super) fn from_json(v: &Value) -> Option<RemoteJob> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let errors = v
            .get("errors")
            .and_then(|e| e.get("data"))
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|e| {
                        let m = e.get("message").and_then(Value::as_str)?;
                        Some(match e.get("line").and_then(Value::as_u64) {
                            Some(line) => format!("line {line}: {m}"),
                            None => m.to_string(),
                        })
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|s| !s.is_empty());
        Some(RemoteJob {
            id: text("id")?,
            status: JobStatus::parse(v.get("status")?.as_str()?)?,
            output_file_id: text("output_file_id"),
            error_file_id: text("error_file_id"),
            intent: v
                .get("metadata")
                .and_then(|m| m.get(INTENT_KEY))
                .and_then(Value::as_str)
                .map(str::to_string),
            created_at: v.get("created_at").and_then(Value::as_i64).unwrap_or(0),
            errors: errors.map(|e| one_line(&e)),
        })
    }
}

/// What one line of an output or error file says about its request.
#[derive(Debug, PartialEq)]
pub enum LineResult {
    /// The vector, and the tokens the provider counted.
    Vector {
        custom_id: String,
        vector: Vec<f32>,
        tokens: Option<u64>,
    },
    /// The provider refused the input (a 400): the row's failure.
    Rejected { custom_id: String, message: String },
    /// Not done (expired, cancelled, a server error, a rate limit): the row
    /// is sent again later.
    Unanswered { custom_id: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_says_why_in_one_line() {
        let v = serde_json::json!({"id": "batch_1", "status": "failed", "created_at": 5,
            "errors": {"object": "list", "data": [{"code": "x", "message": "bad url", "line": 3}]},
            "metadata": {"autoembed_intent": "i-1"}});
        let j = RemoteJob::from_json(&v).expect("job");
        assert_eq!(j.status, JobStatus::Failed);
        assert_eq!(j.intent.as_deref(), Some("i-1"));
        assert_eq!(j.errors.as_deref(), Some("line 3: bad url"));
    }
}
