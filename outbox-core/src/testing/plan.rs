//! What a statement read, from `EXPLAIN ANALYZE`: for tests that a statement finds its rows by key
//! however much history the table holds, which a timing could not show on a shared machine.

/// Runs `explain (analyze, format json)` of `statement` after the `setup` statements (say a
/// `set plan_cache_mode`; may be empty), in one simple query, and returns the plan's top node.
pub async fn explain_analyze(
    client: &tokio_postgres::Client,
    setup: &str,
    statement: &str,
) -> serde_json::Value {
    let explain = format!("explain (analyze, format json) {statement}");
    let sql = if setup.is_empty() {
        explain
    } else {
        format!("{setup}; {explain}")
    };
    let text = client
        .simple_query(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no plan"));
    let plan: serde_json::Value = serde_json::from_str(&text).expect("explain's JSON");
    plan[0]["Plan"].clone()
}

/// A plan node that read a table (or one of its partitions) and ran at least once.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    pub relation: String,
    /// `Seq Scan`, `Index Scan`, `Index Only Scan`, `Bitmap Heap Scan`...
    pub kind: String,
    /// Rows it returned plus rows it read and dropped (by its filter or an index recheck), over
    /// all of its loops.
    pub rows: f64,
}

/// `plan` and every node under it, parents first.
pub fn nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut found = vec![plan];
    for child in plan["Plans"].as_array().into_iter().flatten() {
        found.extend(nodes(child));
    }
    found
}

/// Every scan in `plan` and its children. The target of an insert or update is not a scan.
pub fn scans(plan: &serde_json::Value) -> Vec<Scan> {
    nodes(plan).into_iter().filter_map(scan).collect()
}

/// Rows read from the tables whose name `relation` accepts.
pub fn rows_read(plan: &serde_json::Value, relation: impl Fn(&str) -> bool) -> f64 {
    scans(plan)
        .iter()
        .filter(|scan| relation(&scan.relation))
        .map(|scan| scan.rows)
        .sum()
}

fn scan(node: &serde_json::Value) -> Option<Scan> {
    let number = |key: &str| node[key].as_f64().unwrap_or(0.0);
    let relation = node["Relation Name"].as_str()?;
    let loops = number("Actual Loops");
    (node["Node Type"] != "ModifyTable" && loops > 0.0).then(|| Scan {
        relation: relation.to_owned(),
        kind: node["Node Type"].as_str().unwrap_or("?").to_owned(),
        rows: (number("Actual Rows")
            + number("Rows Removed by Filter")
            + number("Rows Removed by Index Recheck"))
            * loops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_rows_returned_and_dropped_over_loops_and_skips_the_modified_table() {
        let plan = json!({
            "Node Type": "ModifyTable", "Relation Name": "deliveries", "Actual Rows": 0.0,
            "Actual Loops": 1.0,
            "Plans": [
                {"Node Type": "Index Scan", "Relation Name": "deliveries", "Actual Rows": 1.0,
                 "Rows Removed by Filter": 1.0, "Actual Loops": 3.0},
                {"Node Type": "Seq Scan", "Relation Name": "events_default", "Actual Rows": 5.0,
                 "Rows Removed by Filter": 10.0, "Actual Loops": 1.0,
                 "Plans": [{"Node Type": "Seq Scan", "Relation Name": "sent",
                            "Actual Rows": 0.0, "Actual Loops": 0.0}]}
            ]
        });
        assert_eq!(rows_read(&plan, |r| r == "deliveries"), 6.0);
        assert_eq!(rows_read(&plan, |r| r.starts_with("events")), 15.0);
        // Never run: not a scan.
        assert!(scans(&plan).iter().all(|s| s.relation != "sent"));
    }
}
