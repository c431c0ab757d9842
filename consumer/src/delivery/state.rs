use serde::{Deserialize, Serialize};

/// The `state` column of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its next attempt (see [`Hold`] for why it may wait longer), or being sent.
    Pending,
    Succeeded,
    /// No attempt left, or the receiver asked to stop: a dead letter until retried or replayed.
    Dead,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 3] = [Self::Pending, Self::Succeeded, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Why a pending delivery waits beyond its retry time: the `held_by` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Its endpoint's breaker is open (or another delivery is probing it): due again when a probe
    /// may go, or at once when the breaker is reset.
    Breaker,
    /// Its endpoint is disabled: parked, due again when the endpoint is enabled.
    EndpointDisabled,
}

impl Hold {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Breaker => "breaker",
            Self::EndpointDisabled => "endpoint_disabled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Breaker, Self::EndpointDisabled]
            .into_iter()
            .find(|h| h.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_holds_read_back_what_they_write() {
        for s in DeliveryState::ALL {
            assert_eq!(DeliveryState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for h in [Hold::Breaker, Hold::EndpointDisabled] {
            assert_eq!(Hold::parse(h.as_str()), Some(h));
            assert_eq!(serde_json::to_value(h).unwrap(), h.as_str());
        }
        assert_eq!(DeliveryState::parse("PENDING"), None);
    }
}
