//! The product's history rules as tables.

use chathub::{messages_to_tuple_history, parse_history, Error, Message};

/// A table row: name, messages, expected tuples.
type Row = (&'static str, Vec<Message>, Vec<(String, String)>);

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content).expect("known role")
}

#[test]
fn tuple_history_table() {
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    let table: Vec<Row> = vec![
        ("empty", vec![], vec![]),
        (
            "one exchange",
            vec![m("user", "q1"), m("assistant", "r1")],
            vec![s("q1", "r1")],
        ),
        (
            "two exchanges",
            vec![
                m("user", "q1"),
                m("assistant", "r1"),
                m("user", "q2"),
                m("assistant", "r2"),
            ],
            vec![s("q1", "r1"), s("q2", "r2")],
        ),
        (
            "leading system and assistant are skipped",
            vec![
                m("system", "sys"),
                m("assistant", "orphan"),
                m("user", "q1"),
                m("assistant", "r1"),
            ],
            vec![s("q1", "r1")],
        ),
        (
            "consecutive users are joined with a blank line",
            vec![
                m("user", "a"),
                m("user", "b"),
                m("user", "c"),
                m("assistant", "r"),
            ],
            vec![s("a\n\nb\n\nc", "r")],
        ),
        (
            "a trailing unanswered turn is dropped",
            vec![m("user", "q1"), m("assistant", "r1"), m("user", "q2")],
            vec![s("q1", "r1")],
        ),
        (
            "other roles inside a turn are ignored",
            vec![
                m("user", "q1"),
                m("system", "mid"),
                m("observation", "tool"),
                m("assistant", "r1"),
            ],
            vec![s("q1", "r1")],
        ),
        (
            "an assistant after a closed turn is ignored",
            vec![m("user", "q1"), m("assistant", "r1"), m("assistant", "r1b")],
            vec![s("q1", "r1")],
        ),
        (
            "empty user content is not joined (the rule tests length)",
            vec![m("user", ""), m("user", "b"), m("assistant", "r")],
            vec![s("b", "r")],
        ),
        (
            "an empty query still makes a tuple",
            vec![m("user", ""), m("assistant", "r")],
            vec![s("", "r")],
        ),
    ];
    for (name, messages, expected) in table {
        assert_eq!(messages_to_tuple_history(&messages), expected, "{name}");
    }
}

#[test]
fn unknown_roles_are_errors_that_name_the_position() {
    let err = parse_history([("user", "hi"), ("wizard", "x")]).unwrap_err();
    match &err {
        Error::UnknownRole { index, role } => {
            assert_eq!(*index, 1);
            assert_eq!(role, "wizard");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("wizard"), "{err}");
    assert!(Message::new("User", "x").is_err(), "roles are lower-case");
    assert!(Message::new("", "x").is_err());
}
