//! The units config values are written in: sizes and durations.
//!
//! Durations are parsed by `humantime`; the wrapper here adds what
//! humantime-serde lacks: a bare number is refused with a message that asks
//! for a unit, and anything over ten years is refused before it can
//! overflow a deadline. Sizes are parsed here rather than by `bytesize`,
//! which reads `K` and `M` as powers of 1,000: configs written for pushgate
//! say `32K` meaning 32 KiB, and would change meaning.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;

/// A size in bytes, written as a number or with a unit: `32KiB`, `4MiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    pub(super) fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        number.checked_mul(multiplier).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        const EXPECTED: &str = "a size such as `32KiB`, `4MiB` or a number of bytes";
        match Raw::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom(format!("expected {EXPECTED}")))?
        {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!("expected {EXPECTED}, found `{text}`"))
            }),
        }
    }
}

/// Durations are written the human way: `500ms`, `10s`, `5m`, `1h 30m`.
pub(super) mod duration {
    use super::*;

    const EXPECTED: &str = "a duration with a unit, such as `500ms`, `10s` or `5m`";
    const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let text = match &value {
            Value::String(text) => text,
            Value::Number(n) => {
                return Err(serde::de::Error::custom(format!(
                    "expected {EXPECTED}, found the bare number `{n}`"
                )))
            }
            _ => return Err(serde::de::Error::custom(format!("expected {EXPECTED}"))),
        };
        let parsed = humantime::parse_duration(text).map_err(|_| {
            serde::de::Error::custom(format!("expected {EXPECTED}, found `{text}`"))
        })?;
        // Deadlines are computed as now + duration; keep them far from
        // overflow (and from mistakes).
        if parsed > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is longer than the longest duration pushgate takes, 10 years"
            )));
        }
        Ok(parsed)
    }
}
