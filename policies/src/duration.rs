//! Durations in spec files: strings with a unit (`250ms`, `2s`, `1m30s`), parsed by humantime.
//! Bare numbers are rejected, because "2" could mean seconds or milliseconds.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written with a unit. Serializes back as humantime text (`2s`, `250ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SpecDuration(pub Duration);

impl SpecDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for SpecDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for SpecDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SpecDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SpecDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like \"250ms\" or \"2s\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SpecDuration, E> {
                humantime::parse_duration(v.trim())
                    .map(SpecDuration)
                    .map_err(|e| {
                        E::custom(format!(
                            "{v:?} is not a duration with a unit like \"250ms\" or \"2s\": {e}"
                        ))
                    })
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SpecDuration, E> {
                Err(E::custom(format!(
                    "bare number {v} is ambiguous: write a unit, e.g. \"{v}ms\" or \"{v}s\""
                )))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SpecDuration, E> {
                Err(E::custom(format!(
                    "bare number {v} is ambiguous: write a unit, e.g. \"{v}ms\" or \"{v}s\""
                )))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SpecDuration, E> {
                Err(E::custom(format!(
                    "bare number {v} is ambiguous: write a unit, e.g. \"{v}s\""
                )))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_required() {
        let d: SpecDuration = serde_yaml::from_str("250ms").unwrap();
        assert_eq!(d.get(), Duration::from_millis(250));
        let d: SpecDuration = serde_yaml::from_str("\"1m 30s\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(90));
        let err = serde_yaml::from_str::<SpecDuration>("2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bare number 2 is ambiguous"), "{err}");
        assert!(serde_yaml::from_str::<SpecDuration>("soon").is_err());
        assert_eq!(
            serde_yaml::to_string(&SpecDuration(Duration::from_millis(1500)))
                .unwrap()
                .trim(),
            "1s 500ms"
        );
    }
}
