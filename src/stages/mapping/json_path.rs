//! The JSON paths mappings name their values by.

use std::fmt;

use crate::stages::decode::{member, Json};

/// A JSON path of the simple kind Segment mappings use: `$.a.b`, `$['key with spaces']`,
/// `$["k"]`, `$.list[0]`. No wildcards, filters or recursive descent.
#[derive(Debug, Clone)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let Some(rest) = text.strip_prefix('$') else {
            return Err(format!(
                "{text:?} is not a JSON path: it must start with `$`"
            ));
        };
        let fail = |why: &str| format!("{text:?} is not a JSON path: {why}");
        let mut steps = Vec::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '.' => {
                    let mut name = String::new();
                    while let Some(&c) = chars.peek() {
                        if c == '.' || c == '[' {
                            break;
                        }
                        if c == '*' {
                            return Err(fail("wildcards are not supported"));
                        }
                        if c.is_whitespace() || c.is_control() || matches!(c, ']' | '\'' | '"') {
                            return Err(fail(&format!(
                                "{c:?} needs the bracket form, as in $['a b']"
                            )));
                        }
                        name.push(c);
                        chars.next();
                    }
                    if name.is_empty() {
                        return Err(fail("a `.` must be followed by a name"));
                    }
                    steps.push(Step::Key(name));
                }
                '[' => match chars.next() {
                    Some(quote @ ('\'' | '"')) => {
                        let mut name = String::new();
                        loop {
                            match chars.next() {
                                None => return Err(fail("a quoted name is not closed")),
                                Some('\\') => match chars.next() {
                                    Some(escaped @ ('\\' | '\'' | '"')) => name.push(escaped),
                                    _ => return Err(fail("only \\\\, \\' and \\\" are escapes")),
                                },
                                Some(c) if c == quote => break,
                                Some(c) => name.push(c),
                            }
                        }
                        if chars.next() != Some(']') {
                            return Err(fail("a quoted name must be followed by `]`"));
                        }
                        steps.push(Step::Key(name));
                    }
                    Some(first) if first.is_ascii_digit() => {
                        let mut digits = String::from(first);
                        loop {
                            match chars.next() {
                                Some(']') => break,
                                Some(c) if c.is_ascii_digit() => digits.push(c),
                                _ => return Err(fail("an index must be digits followed by `]`")),
                            }
                        }
                        let index = digits.parse().map_err(|_| fail("the index is too large"))?;
                        steps.push(Step::Index(index));
                    }
                    Some('*') => return Err(fail("wildcards are not supported")),
                    _ => return Err(fail("`[` must hold a quoted name or an index")),
                },
                other => return Err(fail(&format!("unexpected {other:?}"))),
            }
        }
        if steps.is_empty() {
            return Err(fail("it names no field"));
        }
        Ok(JsonPath {
            text: text.to_owned(),
            steps,
        })
    }

    /// The value at this path, if every step exists (a JSON `null` counts as present).
    pub fn lookup<'v, 'a>(&self, root: &'v Json<'a>) -> Option<&'v Json<'a>> {
        self.steps.iter().try_fold(root, |value, step| match step {
            Step::Key(key) => member(value.as_object()?, key),
            Step::Index(index) => value.as_array()?.get(*index),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Two paths are the same when they reach the same place, however they are spelled.
impl PartialEq for JsonPath {
    fn eq(&self, other: &Self) -> bool {
        self.steps == other.steps
    }
}

impl Eq for JsonPath {}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for JsonPath {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_parse_and_look_up() {
        let body = serde_json::json!({
            "a": {"b": {"c": 1}},
            "key with spaces": 2,
            "k": {"it's": 3},
            "list": [{"x": 4}],
        });
        let cases = [
            ("dotted_names", "$.a.b.c", Some(1)),
            ("single_quoted_name", "$['key with spaces']", Some(2)),
            (
                "double_quoted_name_with_escaped_quote",
                "$[\"k\"]['it\\'s']",
                Some(3),
            ),
            ("index_then_name", "$.list[0].x", Some(4)),
            ("missing_name", "$.a.zz", None),
            ("index_out_of_range", "$.list[3].x", None),
            ("name_on_a_number", "$.a.b.c.d", None),
        ];
        for (behaviour, text, expected) in cases {
            let path = JsonPath::parse(text).unwrap_or_else(|why| panic!("{behaviour}: {why}"));
            assert_eq!(
                path.to_string(),
                text,
                "{behaviour}: Display gives the text back"
            );
            let body = Json::from(&body);
            let found = path.lookup(&body).and_then(Json::as_i64);
            assert_eq!(found, expected, "{behaviour}");
        }
    }

    #[test]
    fn malformed_json_paths_are_refused() {
        let cases = [
            ("empty", ""),
            ("no_dollar", "a.b"),
            ("root_alone", "$"),
            ("empty_name", "$.a..b"),
            ("trailing_dot", "$.a."),
            ("wildcard", "$.a.*"),
            ("bracket_wildcard", "$[*]"),
            ("unclosed_quote", "$['a"),
            ("unclosed_bracket", "$['a'"),
            ("bare_bracket_name", "$[a]"),
            ("space_in_dotted_name", "$.a b"),
            ("junk_after_root", "$a"),
        ];
        for (behaviour, text) in cases {
            assert!(
                JsonPath::parse(text).is_err(),
                "{behaviour}: {text:?} parsed"
            );
        }
    }
}
