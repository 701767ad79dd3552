use super::*;

const EXAMPLE: &str = include_str!("../../domain.example.toml");

fn parse(text: &str) -> Result<DomainConfig, ConfigError> {
    DomainConfig::from_toml("domain.toml", text)
}

const MINIMAL: &str = "[domain]\nname = \"dmsc.local\"\ntrust_anchor = \"ca.pem\"\n";

#[test]
fn the_example_and_the_development_domain_are_valid() {
    let example = parse(EXAMPLE).unwrap();
    assert_eq!(example.domain.name.get_ref(), "example.org");
    assert_eq!(example.groups.len(), 4);
    assert_eq!(example.invoke.len(), 4);
    let dev = DomainConfig::development();
    assert_eq!(dev.domain.name.get_ref(), "dmsc.local");
    assert_eq!(dev.gateway[0].id.get_ref(), "gw1");
    assert!(parse(MINIMAL).is_ok());
}

#[test]
fn unknown_keys_and_wrong_types_name_line_and_key() {
    let err = parse(&format!(
        "{MINIMAL}\n[groups.a]\nmembers = []\nmembrs = []\n"
    ))
    .unwrap_err();
    match err {
        ConfigError::Parse {
            file,
            line,
            message,
            ..
        } => {
            assert_eq!(file, "domain.toml");
            assert_eq!(line, 7);
            assert!(message.contains("membrs"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let err = parse("[domain]\nname = 3\ntrust_anchor = \"x\"\n").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err:?}");
    let err = parse("[domain]\nname = \"dmsc.local\"\n").unwrap_err();
    assert!(err.to_string().contains("trust_anchor"), "{err}");
}

fn invalid(text: &str) -> (usize, usize, String, String) {
    match parse(text).unwrap_err() {
        ConfigError::Invalid {
            line,
            column,
            key,
            reason,
            ..
        } => (line, column, key, reason),
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_values_name_line_column_and_key() {
    let (line, column, key, _) = invalid(&format!(
        "{MINIMAL}[groups.ops]\nmembers = [\"spiffe://dmsc.local/agent/a\",\n  \"spiffe://dmsc.local/agent/a b\"]\n"
    ));
    assert_eq!(
        (line, column, key.as_str()),
        (6, 3, "groups.ops.members[1]")
    );
    let (line, _, key, reason) = invalid(&format!(
        "{MINIMAL}[groups.ops]\nmembers = [\"spiffe://other.org/agent/a\"]\n"
    ));
    assert_eq!((line, key.as_str()), (5, "groups.ops.members[0]"));
    assert!(reason.contains("trust domain"), "{reason}");
    let (line, _, key, reason) = invalid(&format!(
        "{MINIMAL}[groups.ops]\n[[invoke]]\neffect = \"allow\"\ngroups = [\"ops\", \"opz\"]\ncapabilities = [\"*\"]\n"
    ));
    assert_eq!((line, key.as_str()), (7, "invoke[0].groups[1]"));
    assert!(reason.contains("opz"), "{reason}");
    let (_, _, key, _) = invalid(&format!("{MINIMAL}[groups.ops]\nadvertise = [\"a*b\"]\n"));
    assert_eq!(key, "groups.ops.advertise[0]");
    let (line, _, key, _) = invalid(&format!(
        "{MINIMAL}[[gateway]]\nid = \"g\"\n[[gateway]]\nid = \"g\"\n"
    ));
    assert_eq!((line, key.as_str()), (7, "gateway[1].id"));
    let (_, _, key, _) = invalid(&format!("{MINIMAL}[groups.\"a b\"]\n"));
    assert_eq!(key, "groups.a b");
    let (_, _, key, _) = invalid(&format!(
        "{MINIMAL}[groups.a]\nrate_limit = {{ per_second = 0 }}\n"
    ));
    assert_eq!(key, "groups.a.rate_limit");
    let (line, _, key, _) = invalid("[domain]\nname = \"Not A Domain\"\ntrust_anchor = \"x\"\n");
    assert_eq!((line, key.as_str()), (2, "domain.name"));
    let (_, _, key, _) =
        invalid("capabilities = [\"has space\"]\n[domain]\nname = \"d\"\ntrust_anchor = \"x\"\n");
    assert_eq!(key, "capabilities[0]");
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("ab\ncä\nd", 0), (1, 1));
    assert_eq!(line_column("ab\ncä\nd", 3), (2, 1));
    assert_eq!(line_column("ab\ncä\nd", 7), (3, 1));
    assert_eq!(line_column("ab\ncä\nd", 5), (2, 2));
    assert_eq!(line_column("ab", 99), (1, 3));
}
