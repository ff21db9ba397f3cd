//! Reading the statements a service issued from PostgreSQL's log (`log_statement = all`
//! with the log line prefix [`LOG_LINE_PREFIX`]), for the `payments` scenario's pgbench
//! baseline.
//!
//! A record starts at a line beginning with the prefix (`@@bench@@<pid>@@<user>@@ `);
//! lines without it continue the record before (PostgreSQL starts them with a tab).
//! Statements are `LOG:  statement: <sql>` (simple protocol, e.g. BEGIN/COMMIT) and
//! `LOG:  execute <name>: <sql>` (extended protocol), the latter followed by
//! `DETAIL:  parameters: $1 = '…', $2 = NULL` when it has parameters.

use anyhow::{Context as _, bail};

/// The `log_line_prefix` the capture sets: a marker, the backend's pid and user.
pub const LOG_LINE_PREFIX: &str = "@@bench@@%p@@%u@@ ";
const MARKER: &str = "@@bench@@";

/// One statement as the server executed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The backend that ran it.
    pub pid: u32,
    pub sql: String,
    /// `$1`, `$2`, … in order; `None` for NULL.
    pub params: Vec<Option<String>>,
}

/// The statements `user` ran, in log order, from a log excerpt.
pub fn statements(log: &str, user: &str) -> anyhow::Result<Vec<Statement>> {
    let mut records: Vec<(u32, String, String)> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix(MARKER) {
            let mut fields = rest.splitn(3, "@@");
            let (Some(pid), Some(who), Some(message)) =
                (fields.next(), fields.next(), fields.next())
            else {
                bail!("a log line with the bench prefix but no pid/user: {line}");
            };
            let pid = pid
                .parse()
                .with_context(|| format!("a log line with a bad pid: {line}"))?;
            records.push((pid, who.to_owned(), message.trim_start().to_owned()));
        } else if let Some((_, _, message)) = records.last_mut() {
            message.push('\n');
            message.push_str(line.strip_prefix('\t').unwrap_or(line));
        }
    }
    let mut statements: Vec<Statement> = Vec::new();
    for (pid, who, message) in records {
        if who != user {
            continue;
        }
        if let Some(sql) = message.strip_prefix("LOG:  statement: ") {
            statements.push(Statement {
                pid,
                sql: sql.to_owned(),
                params: Vec::new(),
            });
        } else if let Some(rest) = message.strip_prefix("LOG:  execute ") {
            let (_, sql) = rest
                .split_once(": ")
                .with_context(|| format!("an execute record without a statement: {message}"))?;
            statements.push(Statement {
                pid,
                sql: sql.to_owned(),
                params: Vec::new(),
            });
        } else if let Some(params) = message.strip_prefix("DETAIL:  parameters: ") {
            let statement = statements
                .iter_mut()
                .rev()
                .find(|statement| statement.pid == pid)
                .with_context(|| format!("parameters before any statement: {message}"))?;
            statement.params = parameters(params)?;
        }
    }
    Ok(statements)
}

/// `$1 = 'a''b', $2 = NULL` → `[Some("a'b"), None]`, checked to be `$1`, `$2`, … in order.
pub fn parameters(text: &str) -> anyhow::Result<Vec<Option<String>>> {
    let mut params = Vec::new();
    let mut rest = text.trim_end();
    while !rest.is_empty() {
        let expected = format!("${} = ", params.len() + 1);
        rest = rest
            .strip_prefix(&expected)
            .with_context(|| format!("expected `{expected}` in parameters: {text}"))?;
        if let Some(after) = rest.strip_prefix("NULL") {
            params.push(None);
            rest = after;
        } else if let Some(quoted) = rest.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((index, '\'')) => {
                        if quoted[index + 1..].starts_with('\'') {
                            value.push('\'');
                            chars.next();
                        } else {
                            break index + 1;
                        }
                    }
                    Some((_, c)) => value.push(c),
                    None => bail!("an unterminated parameter value: {text}"),
                }
            };
            params.push(Some(value));
            rest = &quoted[end..];
        } else {
            bail!("a parameter that is neither NULL nor quoted: {text}");
        }
        rest = rest.strip_prefix(", ").unwrap_or(rest);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_unquote_and_keep_nulls() -> anyhow::Result<()> {
        assert_eq!(
            parameters("$1 = 'a''b', $2 = NULL, $3 = '', $4 = 'x, $5 = y'")?,
            [
                Some("a'b".to_owned()),
                None,
                Some(String::new()),
                Some("x, $5 = y".to_owned())
            ]
        );
        assert!(parameters("$2 = 'a'").is_err());
        assert!(parameters("$1 = 'a").is_err());
        Ok(())
    }

    #[test]
    fn statements_join_continuation_lines_and_attach_parameters() -> anyhow::Result<()> {
        let log = "\
@@bench@@10@@paysuite_app@@ LOG:  statement: BEGIN
@@bench@@11@@postgres@@ LOG:  statement: SELECT 1
@@bench@@10@@paysuite_app@@ LOG:  execute sqlx_s_1: SELECT id
\tFROM t WHERE a = $1 AND b = $2
@@bench@@10@@paysuite_app@@ DETAIL:  parameters: $1 = 'it''s', $2 = NULL
@@bench@@10@@paysuite_app@@ LOG:  statement: COMMIT
";
        let statements = statements(log, "paysuite_app")?;
        let sql: Vec<&str> = statements.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "BEGIN",
                "SELECT id\nFROM t WHERE a = $1 AND b = $2",
                "COMMIT"
            ]
        );
        assert_eq!(statements[1].params, [Some("it's".to_owned()), None]);
        assert!(statements[2].params.is_empty());
        Ok(())
    }
}
