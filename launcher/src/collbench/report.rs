//! collbench's output: nccl-tests' table, and the same rows as JSON lines.

use std::fmt::Write as _;

/// One measured row.
pub struct Row {
    pub coll: &'static str,
    pub bytes: u64,
    pub count: u64,
    pub dtype: &'static str,
    pub redop: &'static str,
    pub root: i64,
    pub time_us: f64,
    pub algbw: f64,
    pub busbw: f64,
    pub wrong: Option<u64>,
}

/// The table's two header lines.
pub fn header() -> String {
    format!(
        "# {:>11} {:>12} {:>9} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}  {}\n# {:>11} {:>12} {:>9} \
         {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "coll",
        "(B)",
        "(elements)",
        "",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
    )
}

/// A row of the table.
pub fn line(r: &Row) -> String {
    let wrong = match r.wrong {
        Some(w) => w.to_string(),
        None => "N/A".into(),
    };
    format!(
        "  {:>11} {:>12} {:>9} {:>6} {:>5} {:>10.2} {:>8.3} {:>8.3} {:>7}  {}",
        r.bytes, r.count, r.dtype, r.redop, r.root, r.time_us, r.algbw, r.busbw, wrong, r.coll
    )
}

/// A row as one JSON object (no string in it needs escaping: they are
/// collbench's own names).
pub fn json(r: &Row, ranks: usize) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{{\"coll\":\"{}\",\"ranks\":{ranks},\"bytes\":{},\"count\":{},\"type\":\"{}\",\
         \"redop\":\"{}\",\"root\":{},\"time_us\":{:.3},\"algbw_gbs\":{:.6},\"busbw_gbs\":{:.6},\
         \"wrong\":{}}}",
        r.coll,
        r.bytes,
        r.count,
        r.dtype,
        r.redop,
        r.root,
        r.time_us,
        r.algbw,
        r.busbw,
        match r.wrong {
            Some(w) => w.to_string(),
            None => "null".into(),
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_lines_up_with_the_header_and_its_json_parses_by_eye() {
        let r = Row {
            coll: "allreduce",
            bytes: 1 << 20,
            count: 1 << 18,
            dtype: "float",
            redop: "sum",
            root: -1,
            time_us: 123.456,
            algbw: 8.5,
            busbw: 12.75,
            wrong: Some(0),
        };
        let l = line(&r);
        let h = header();
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(
            cols,
            vec![
                "1048576",
                "262144",
                "float",
                "sum",
                "-1",
                "123.46",
                "8.500",
                "12.750",
                "0",
                "allreduce"
            ]
        );
        // Right-aligned columns end where the header's titles end.
        let first = h.lines().next().unwrap();
        assert_eq!(
            first.find("time").unwrap() + 4,
            l.find("123.46").unwrap() + 6
        );
        let j = json(&r, 4);
        assert!(j.starts_with("{\"coll\":\"allreduce\",\"ranks\":4,\"bytes\":1048576,"));
        assert!(j.ends_with("\"wrong\":0}"));
    }
}
