//! The one page-limit rule of every list route: `limit` absent means the route's default, 1 to
//! its maximum is accepted, anything else answers `400 invalid_limit`. A full page names the
//! cursor of the next one.

use super::ApiError;

/// The page sizes one list route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    /// The size of a page when the request names none.
    pub default: i64,
    /// The largest page a request may ask for.
    pub max: i64,
}

impl PageLimit {
    pub const fn new(default: i64, max: i64) -> Self {
        PageLimit { default, max }
    }

    /// The page size for a request's `limit`: the default when absent, the value when it is
    /// between 1 and [`PageLimit::max`], else `400 {"code": "invalid_limit"}`.
    pub fn of(self, requested: Option<i64>) -> Result<i64, ApiError> {
        match requested.unwrap_or(self.default) {
            n if (1..=self.max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be between 1 and {}", self.max),
            )),
        }
    }
}

/// The cursor of the next page: the key of the last item when the page is full (`limit` items),
/// none when it is not (this was the last page).
pub fn next_cursor<T, K>(items: &[T], limit: i64, key: impl Fn(&T) -> K) -> Option<K> {
    if items.len() as i64 == limit {
        items.last().map(key)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_means_default_and_only_one_to_max_is_accepted() {
        let page = PageLimit::new(50, 500);
        assert_eq!(page.of(None).unwrap(), 50);
        assert_eq!(page.of(Some(1)).unwrap(), 1);
        assert_eq!(page.of(Some(500)).unwrap(), 500);
        for bad in [0, -1, 501, i64::MAX, i64::MIN] {
            let error = page.of(Some(bad)).unwrap_err();
            assert_eq!(error.code, "invalid_limit");
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn only_a_full_page_names_a_next_cursor() {
        let items = [10, 11, 12];
        assert_eq!(next_cursor(&items, 3, |i| *i), Some(12));
        assert_eq!(next_cursor(&items, 4, |i| *i), None);
        assert_eq!(next_cursor::<i32, i32>(&[], 3, |i| *i), None);
    }
}
