//! One clock for the host, the simulator and the handler.
//!
//! A local run plays simulated time `1 / time_scale` times faster than the wall clock, so a 30-minute
//! backup job finishes in under two seconds. Every process of a run derives "now" from the same origin
//! pair (wall instant, simulated instant) and the same scale, carried to child processes in
//! environment variables, so that timers, scheduled messages, jobs and the timeline agree.

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use std::time::Duration;

/// Environment variable holding the wall-clock origin (milliseconds since the Unix epoch).
pub const ENV_ORIGIN_WALL_MS: &str = "VMBACKUP_CLOCK_ORIGIN_WALL_MS";
/// Environment variable holding the simulated origin (milliseconds since the Unix epoch).
pub const ENV_ORIGIN_SIM_MS: &str = "VMBACKUP_CLOCK_ORIGIN_SIM_MS";
/// Environment variable holding the time scale: wall seconds per simulated second (0.001 = 1000x faster).
pub const ENV_TIME_SCALE: &str = "VMBACKUP_TIME_SCALE";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    origin_wall_ms: i64,
    origin_sim_ms: i64,
    /// Wall seconds per simulated second; 1.0 is real time.
    time_scale: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("{name} must be {expected}, got {value:?}")]
    Invalid {
        name: &'static str,
        expected: &'static str,
        value: String,
    },
}

impl Clock {
    /// The real clock: simulated time is wall time.
    pub fn real() -> Self {
        Clock {
            origin_wall_ms: 0,
            origin_sim_ms: 0,
            time_scale: 1.0,
        }
    }

    /// A clock that starts at `sim_start` now and runs `1 / time_scale` times faster than the wall clock.
    /// `time_scale` must be finite and positive (callers validate user input first).
    pub fn scaled(sim_start: DateTime<Utc>, time_scale: f64) -> Self {
        Clock {
            origin_wall_ms: Utc::now().timestamp_millis(),
            origin_sim_ms: sim_start.timestamp_millis(),
            time_scale,
        }
    }

    pub fn is_real(&self) -> bool {
        self.time_scale == 1.0 && self.origin_wall_ms == self.origin_sim_ms
    }

    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// The current simulated instant.
    pub fn now(&self) -> DateTime<Utc> {
        self.sim_at_wall(Utc::now())
    }

    /// The simulated instant that corresponds to a wall instant.
    pub fn sim_at_wall(&self, wall: DateTime<Utc>) -> DateTime<Utc> {
        let elapsed_wall = (wall.timestamp_millis() - self.origin_wall_ms) as f64;
        let sim_ms = self.origin_sim_ms + (elapsed_wall / self.time_scale).round() as i64;
        Utc.timestamp_millis_opt(sim_ms).single().unwrap_or(wall)
    }

    /// How long to wait on the wall clock for `sim` of simulated time to pass.
    pub fn wall_duration(&self, sim: Duration) -> Duration {
        sim.mul_f64(self.time_scale)
    }

    /// How long to wait on the wall clock until simulated instant `at` (zero if it is past).
    pub fn wall_until(&self, at: DateTime<Utc>) -> Duration {
        let remaining = at - self.now();
        if remaining <= ChronoDuration::zero() {
            return Duration::ZERO;
        }
        remaining
            .to_std()
            .map(|d| self.wall_duration(d))
            .unwrap_or(Duration::ZERO)
    }

    /// Sleep for `sim` of simulated time.
    pub async fn sleep(&self, sim: Duration) {
        tokio::time::sleep(self.wall_duration(sim)).await
    }

    /// Sleep until the simulated instant `at`.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        tokio::time::sleep(self.wall_until(at)).await
    }

    /// The variables that hand this clock to a child process.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (ENV_ORIGIN_WALL_MS, self.origin_wall_ms.to_string()),
            (ENV_ORIGIN_SIM_MS, self.origin_sim_ms.to_string()),
            (ENV_TIME_SCALE, self.time_scale.to_string()),
        ]
    }

    /// The clock handed down by a parent process, or the real clock when none was.
    pub fn from_env() -> Result<Self, ClockError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ClockError> {
        let Some(scale) = lookup(ENV_TIME_SCALE) else {
            return Ok(Clock::real());
        };
        let time_scale: f64 = scale
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s > 0.0)
            .ok_or(ClockError::Invalid {
                name: ENV_TIME_SCALE,
                expected: "a positive number",
                value: scale.clone(),
            })?;
        let millis = |name: &'static str| -> Result<i64, ClockError> {
            let value = lookup(name).unwrap_or_default();
            value.parse().map_err(|_| ClockError::Invalid {
                name,
                expected: "milliseconds since the Unix epoch",
                value,
            })
        };
        Ok(Clock {
            origin_wall_ms: millis(ENV_ORIGIN_WALL_MS)?,
            origin_sim_ms: millis(ENV_ORIGIN_SIM_MS)?,
            time_scale,
        })
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::real()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn scaled_clock_runs_faster_than_the_wall() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = Clock {
            origin_wall_ms: 1_000_000,
            origin_sim_ms: start.timestamp_millis(),
            time_scale: 0.001,
        };
        let wall = Utc.timestamp_millis_opt(1_000_000 + 1_800).unwrap();
        assert_eq!(clock.sim_at_wall(wall), start + ChronoDuration::minutes(30));
        assert_eq!(
            clock.wall_duration(Duration::from_secs(1800)),
            Duration::from_millis(1800)
        );
    }

    #[test]
    fn env_round_trip_and_errors_name_the_variable() {
        let clock = Clock::scaled(Utc::now(), 0.01);
        let env: HashMap<_, _> = clock
            .to_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(Clock::from_lookup(|k| env.get(k).cloned()), Ok(clock));
        assert_eq!(Clock::from_lookup(|_| None), Ok(Clock::real()));
        let err = Clock::from_lookup(|k| (k == ENV_TIME_SCALE).then(|| "-1".to_string()));
        assert!(err.unwrap_err().to_string().contains(ENV_TIME_SCALE));
    }
}
