//! What both OpenAI-shaped clients ([`super::openai`], [`super::batch_api`])
//! need of HTTP: a reply's body read within a limit, a provider's message
//! on one line, a transport failure named, `Retry-After` read, an id as one
//! URL path segment.

use super::ProviderError;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A reply's body into `buf`, at most `limit` bytes.
pub(super) fn read_body(
    resp: ureq::Response,
    buf: &mut Vec<u8>,
    limit: u64,
) -> Result<(), ProviderError> {
    if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        buf.reserve(len.min(limit as usize));
    }
    resp.into_reader()
        .take(limit)
        .read_to_end(buf)
        .map_err(|e| ProviderError::Transient {
            retry_after: None,
            message: format!("reply cut short: {e}"),
        })?;
    Ok(())
}

/// `s` as one URL path segment: unreserved characters as they are, every
/// other byte percent-encoded (an Azure deployment's name goes in the path).
pub(super) fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A transport failure (DNS, connect, TLS, a reset) in one line.
pub(super) fn transport_message(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s.push_str(": ");
        s.push_str(m);
    }
    if let Some(src) = std::error::Error::source(t) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s
}

/// A provider's message on one line, at most 300 characters.
pub(super) fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 300 {
        flat.chars().take(300).collect::<String>() + "..."
    } else {
        flat
    }
}

/// `retry-after-ms`, then `retry-after` (seconds or an HTTP date).
pub(super) fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    if let Some(ms) = resp
        .header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let v = resp.header("retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = parse_http_date(v)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(when.saturating_sub(now)))
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    // A date no server means (and whose arithmetic would overflow).
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) {
        return None;
    }
    let hms: Vec<i64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3
        || !(0..24).contains(&hms[0])
        || !(0..60).contains(&hms[1])
        || !(0..61).contains(&hms[2])
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        // Dates no server means are no date, not an overflow.
        for odd in [
            "Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            "Sun, 99999999999 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 99999999999999:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(odd), None, "{odd}");
        }
    }
}
