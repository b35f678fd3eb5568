//! Contacts from a CSV file: the header, each line read into an [`ImportRow`] or reported
//! with its line number and why it was skipped ([`parse`]), and how a row merges into a
//! contact ([`ImportRow::apply`]). Pure: it reads the bytes it is given and nothing else;
//! `store::import` writes the rows and the parent module ties the two together.
//!
//! The format (the README's "Import contacts" shows an example):
//!
//! * The first line names the columns, in any order: `wa_id`, `bsuid`, `name`, `tags`,
//!   `timezone` and `attr.KEY` (any number, `KEY` not empty). At least one of `wa_id` and
//!   `bsuid` must be there; both pair the two on the contact, as a webhook carrying both
//!   does. Any other column, or a column named twice, rejects the whole file (naming the
//!   column): a misspelt `timezon` would otherwise drop a column of data unnoticed.
//! * `wa_id` is a phone number in E.164 form: an optional leading `+`, then 8 to 15 ASCII
//!   digits, the first not `0` (a country code never starts with 0). No spaces, dashes or
//!   brackets: a number is written one way, so it matches the `wa_id` WhatsApp's webhooks
//!   send. It is stored without the `+`.
//! * `bsuid` is a business-scoped user id: two capital letters (the country), a period,
//!   optionally `ENT.` (a parent BSUID), then 1 to 128 letters or digits
//!   (`US.13491208655302741918`); stored exactly as written.
//! * `tags` are separated by `;` (a `,` would need quoting in CSV); each is trimmed and
//!   empty ones are dropped. Tags are added to the contact's, never removed.
//! * `attr.KEY` sets the contact's attribute `KEY` to the cell's text (always a string: CSV
//!   has no types, and `01234` must stay a postcode). An empty cell leaves the attribute
//!   as it is.
//! * `timezone` is an IANA name (`Europe/Berlin`), stored as written.
//! * Every cell is trimmed; an empty cell means "not given" (it clears nothing).
//!
//! A line with a bad phone, BSUID or time zone, with neither identifier, with a field that
//! is not UTF-8, or with another number of fields than the header is skipped and reported;
//! the rest are imported. Blank lines (and lines of empty cells, as spreadsheets export)
//! are ignored. A UTF-8 byte order mark, CRLF line ends and quoted fields (with commas,
//! quotes and line breaks in them) are read as CSV has them. Line numbers count physical
//! lines from 1 (the header), so a quoted line break moves the lines after it.

use std::collections::BTreeSet;
use std::str::FromStr as _;

use serde::Serialize;

use crate::diagnostic::did_you_mean;
use crate::domain::{self, InvalidIdentifier};

/// The separator of the `tags` column.
pub const TAG_SEPARATOR: char = ';';

/// One line of the file, checked: what to write to the contact it names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportRow {
    /// The line the record starts on (the header is line 1).
    pub line: u64,
    /// The phone number, digits only (no `+`).
    pub phone: Option<String>,
    pub bsuid: Option<String>,
    pub name: Option<String>,
    pub tags: BTreeSet<String>,
    pub attrs: serde_json::Map<String, serde_json::Value>,
    pub timezone: Option<String>,
}

/// What an import can change of a contact (its identifiers aside).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub name: Option<String>,
    pub tags: BTreeSet<String>,
    pub attrs: serde_json::Map<String, serde_json::Value>,
    pub timezone: Option<String>,
}

impl ImportRow {
    /// Merges the row into a contact's `profile`: tags added (never removed), attributes
    /// set per key (the file wins), the name and time zone set when given. Whether anything
    /// changed: importing the same row again changes nothing.
    pub fn apply(&self, profile: &mut Profile) -> bool {
        let before = profile.clone();
        if let Some(name) = &self.name {
            profile.name = Some(name.clone());
        }
        profile.tags.extend(self.tags.iter().cloned());
        for (key, value) in &self.attrs {
            profile.attrs.insert(key.clone(), value.clone());
        }
        if let Some(timezone) = &self.timezone {
            profile.timezone = Some(timezone.clone());
        }
        *profile != before
    }
}

/// A line that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedLine {
    pub line: u64,
    pub reason: String,
}

/// A file read: the rows to import, in file order, and the lines skipped.
#[derive(Debug, Default)]
pub struct Parsed {
    pub rows: Vec<ImportRow>,
    pub skipped: Vec<SkippedLine>,
}

/// Why a whole file cannot be imported (nothing of it is).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("the file is empty: its first line must name the columns (e.g. `wa_id,name,tags`)")]
    Empty,
    #[error(
        "the header (line 1) names neither `wa_id` nor `bsuid`: add a column with the \
         customers' phone numbers (`wa_id`) or business-scoped user ids (`bsuid`)"
    )]
    NoIdentifierColumn,
    #[error(
        "unknown column `{column}` (column {position} of the header){hint}; the columns are \
         wa_id, bsuid, name, tags, timezone and attr.KEY"
    )]
    UnknownColumn {
        column: String,
        position: usize,
        hint: String,
    },
    #[error("the column `{column}` is named twice in the header (columns {first} and {second})")]
    DuplicateColumn {
        column: String,
        first: usize,
        second: usize,
    },
    #[error("the header (line 1) cannot be read: {0}; save the file as CSV in UTF-8")]
    Header(String),
    #[error("line {line} cannot be read as CSV: {reason}; nothing was imported")]
    Unreadable { line: u64, reason: String },
}

/// What a header column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column {
    WaId,
    Bsuid,
    Name,
    Tags,
    Timezone,
    Attr(String),
}

impl Column {
    const NAMES: [&'static str; 5] = ["wa_id", "bsuid", "name", "tags", "timezone"];

    fn of(name: &str, position: usize) -> Result<Column, FileError> {
        let column = match name {
            "wa_id" => Column::WaId,
            "bsuid" => Column::Bsuid,
            "name" => Column::Name,
            "tags" => Column::Tags,
            "timezone" => Column::Timezone,
            _ => match name.strip_prefix("attr.").filter(|key| !key.is_empty()) {
                Some(key) => Column::Attr(key.to_string()),
                None => {
                    let hint = if name == "attr." {
                        Some("an attribute column needs a key: `attr.city`".to_string())
                    } else {
                        did_you_mean(name, Column::NAMES)
                    };
                    return Err(FileError::UnknownColumn {
                        column: name.to_string(),
                        position,
                        hint: hint.map(|h| format!(": {h}")).unwrap_or_default(),
                    });
                }
            },
        };
        Ok(column)
    }
}

/// Reads a whole CSV file. `Err` only when the file as a whole cannot be imported; bad lines
/// are in [`Parsed::skipped`].
pub fn parse(bytes: &[u8]) -> Result<Parsed, FileError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut records = reader.byte_records();
    let header = match records.next() {
        None => return Err(FileError::Empty),
        Some(Err(e)) => return Err(FileError::Header(e.to_string())),
        Some(Ok(header)) => header,
    };
    let columns = columns(&header)?;
    let mut parsed = Parsed::default();
    let mut lines = Lines::new(bytes);
    for record in records {
        let record = record.map_err(|e| FileError::Unreadable {
            line: lines.at(e.position().map_or(0, |p| p.byte())),
            reason: e.to_string(),
        })?;
        let line = lines.at(record.position().map_or(0, |p| p.byte()));
        if record.iter().all(|field| field.trim_ascii().is_empty()) {
            continue;
        }
        match row(&columns, &record, line) {
            Ok(row) => parsed.rows.push(row),
            Err(reason) => parsed.skipped.push(SkippedLine { line, reason }),
        }
    }
    Ok(parsed)
}

/// Line numbers of records. The csv crate's own miscounts blank lines and CRLF ends, so
/// they are counted here: from the byte offset where the reader began a record, past the
/// line ends it skipped (a record never starts with one), and each `\n`, `\r\n` or lone
/// `\r` before that starts a new line. Offsets only grow, so the file is counted once.
struct Lines<'a> {
    bytes: &'a [u8],
    counted: usize,
    line: u64,
}

impl<'a> Lines<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            counted: 0,
            line: 1,
        }
    }

    /// The line of the record the reader began at byte `offset`.
    fn at(&mut self, offset: u64) -> u64 {
        let bytes = self.bytes;
        let mut start = usize::try_from(offset).map_or(bytes.len(), |o| o.min(bytes.len()));
        while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        for i in self.counted..start {
            let lone_cr = bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n');
            if bytes[i] == b'\n' || lone_cr {
                self.line += 1;
            }
        }
        self.counted = self.counted.max(start);
        self.line
    }
}

/// The header's columns, checked.
fn columns(header: &csv::ByteRecord) -> Result<Vec<Column>, FileError> {
    let mut columns: Vec<Column> = Vec::with_capacity(header.len());
    let mut names: Vec<&str> = Vec::with_capacity(header.len());
    for (i, raw) in header.iter().enumerate() {
        let name = std::str::from_utf8(raw)
            .map_err(|_| FileError::Header(format!("column {} is not UTF-8 text", i + 1)))?
            .trim();
        if let Some(first) = names.iter().position(|n| *n == name) {
            return Err(FileError::DuplicateColumn {
                column: name.to_string(),
                first: first + 1,
                second: i + 1,
            });
        }
        columns.push(Column::of(name, i + 1)?);
        names.push(name);
    }
    if !columns
        .iter()
        .any(|c| matches!(c, Column::WaId | Column::Bsuid))
    {
        return Err(FileError::NoIdentifierColumn);
    }
    Ok(columns)
}

/// One record as a row, or why it is skipped.
fn row(columns: &[Column], record: &csv::ByteRecord, line: u64) -> Result<ImportRow, String> {
    if record.len() != columns.len() {
        return Err(format!(
            "{} fields, but the header names {} columns (a comma too many or too few? quote \
             a cell that holds a comma)",
            record.len(),
            columns.len()
        ));
    }
    let mut row = ImportRow {
        line,
        ..ImportRow::default()
    };
    for (i, (column, raw)) in columns.iter().zip(record.iter()).enumerate() {
        let cell = std::str::from_utf8(raw)
            .map_err(|_| format!("field {} is not UTF-8 text: save the file in UTF-8", i + 1))?
            .trim();
        if cell.is_empty() {
            continue;
        }
        match column {
            Column::WaId => row.phone = Some(phone(cell)?),
            Column::Bsuid => row.bsuid = Some(bsuid(cell)?),
            Column::Name => row.name = Some(cell.to_string()),
            Column::Tags => row.tags.extend(tags(cell)),
            Column::Timezone => row.timezone = Some(timezone(cell)?),
            Column::Attr(key) => {
                row.attrs.insert(key.clone(), cell.into());
            }
        }
    }
    if row.phone.is_none() && row.bsuid.is_none() {
        return Err("neither a wa_id nor a bsuid: a contact needs one of them".into());
    }
    Ok(row)
}

/// A phone number in E.164 form, without its `+` ([`domain::phone_number`]'s rule).
pub fn phone(cell: &str) -> Result<String, String> {
    domain::phone_number(cell).map_err(|e| match e {
        InvalidIdentifier::BsuidNotPhone(_) => format!("wa_id {e}: put it in the bsuid column"),
        e => format!("wa_id {e}"),
    })
}

/// A business-scoped user id ([`domain::bsuid`]'s rule).
pub fn bsuid(cell: &str) -> Result<String, String> {
    domain::bsuid(cell).map_err(|e| format!("bsuid {e}"))
}

/// The tags of a `tags` cell.
fn tags(cell: &str) -> impl Iterator<Item = String> + '_ {
    cell.split(TAG_SEPARATOR)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// An IANA time zone name.
fn timezone(cell: &str) -> Result<String, String> {
    match chrono_tz::Tz::from_str(cell) {
        Ok(_) => Ok(cell.to_string()),
        Err(_) => Err(format!(
            "unknown time zone `{cell}`: use an IANA name such as Europe/Berlin or \
             America/New_York"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Parsed {
        parse(text.as_bytes()).unwrap()
    }

    fn reasons(parsed: &Parsed) -> Vec<(u64, &str)> {
        parsed
            .skipped
            .iter()
            .map(|s| (s.line, s.reason.as_str()))
            .collect()
    }

    #[test]
    fn every_column_is_read() {
        let parsed = parse_ok(
            "wa_id,bsuid,name,tags,attr.city,attr.zip,timezone\n\
             +4915123456789,DE.123abc,Ada Lovelace, vip ; customers;;,Berlin,01234,Europe/Berlin\n",
        );
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let row = &parsed.rows[0];
        assert_eq!(row.line, 2);
        assert_eq!(row.phone.as_deref(), Some("4915123456789"));
        assert_eq!(row.bsuid.as_deref(), Some("DE.123abc"));
        assert_eq!(row.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(
            row.tags.iter().map(String::as_str).collect::<Vec<_>>(),
            ["customers", "vip"]
        );
        assert_eq!(row.attrs["city"], "Berlin");
        assert_eq!(row.attrs["zip"], "01234", "attributes stay text");
        assert_eq!(row.timezone.as_deref(), Some("Europe/Berlin"));
    }

    #[test]
    fn columns_come_in_any_order_and_empty_cells_are_not_given() {
        let parsed = parse_ok("name,bsuid\n,US.1\nBob,US.ENT.2\n");
        assert_eq!(parsed.rows.len(), 2);
        assert_eq!(parsed.rows[0].name, None);
        assert_eq!(parsed.rows[0].phone, None);
        assert_eq!(parsed.rows[1].bsuid.as_deref(), Some("US.ENT.2"));
        assert_eq!(parsed.rows[1].name.as_deref(), Some("Bob"));
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number_and_skipped() {
        let parsed = parse_ok(
            "wa_id,bsuid,timezone\n\
             4915123456789,,\n\
             49 151 234567,,\n\
             1234567,,\n\
             1234567890123456,,\n\
             015123456789,,\n\
             US.1349,,\n\
             ,us.1349,\n\
             ,US.,\n\
             4915123456780,,Europe/Berlín\n\
             ,,Europe/Berlin\n\
             4915123456781,,UTC,extra\n\
             4915123456782\n\
             +4915123456783,US.77,Asia/Tokyo\n",
        );
        let lines: Vec<u64> = parsed.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 14]);
        let reasons = reasons(&parsed);
        let expect = [
            (3, "is not a phone number"),
            (4, "has 7 digits"),
            (5, "has 16 digits"),
            (6, "starts with 0"),
            (7, "put it in the bsuid column"),
            (8, "bsuid `us.1349` is not a business-scoped user id"),
            (9, "bsuid `US.` is not"),
            (10, "unknown time zone `Europe/Berlín`"),
            (11, "neither a wa_id nor a bsuid"),
            (12, "4 fields, but the header names 3 columns"),
            (13, "1 fields, but the header names 3 columns"),
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
        for ((line, reason), (want_line, want)) in reasons.iter().zip(expect) {
            assert_eq!(*line, want_line, "{reason}");
            assert!(reason.contains(want), "line {line}: {reason}");
        }
    }

    #[test]
    fn a_row_adds_tags_merges_attrs_and_sets_what_it_gives() {
        let parsed = parse_ok("wa_id,tags,attr.city,attr.plan\n4915123456789,new;vip,Paris,\n");
        let row = &parsed.rows[0];
        let mut profile = Profile {
            name: Some("Ada".into()),
            tags: ["old".to_string(), "vip".to_string()].into(),
            attrs: serde_json::json!({"city": "Berlin", "plan": "gold"})
                .as_object()
                .unwrap()
                .clone(),
            timezone: Some("Europe/Berlin".into()),
        };
        assert!(row.apply(&mut profile));
        assert_eq!(profile.name.as_deref(), Some("Ada"), "not given: kept");
        assert_eq!(profile.tags.len(), 3);
        assert_eq!(profile.attrs["city"], "Paris", "the file wins");
        assert_eq!(
            profile.attrs["plan"], "gold",
            "an empty cell clears nothing"
        );
        assert_eq!(profile.timezone.as_deref(), Some("Europe/Berlin"));
        assert!(
            !row.apply(&mut profile),
            "the same row again changes nothing"
        );
    }

    #[test]
    fn the_phone_rule_is_exact() {
        assert_eq!(phone("12345678").unwrap(), "12345678");
        assert_eq!(phone("+123456789012345").unwrap(), "123456789012345");
        assert!(phone("++4915123456789").is_err());
        assert!(phone("4915123456789+").is_err());
        assert!(phone("49-151-23456789").is_err());
        assert!(
            phone("４９151234567").is_err(),
            "full-width digits are not ASCII"
        );
        assert!(phone("+").is_err());
        assert!(bsuid(&format!("US.{}", "a".repeat(128))).is_ok());
        assert!(bsuid(&format!("US.{}", "a".repeat(129))).is_err());
        assert!(bsuid("USA.123").is_err());
        assert!(bsuid("US.12-3").is_err());
    }

    #[test]
    fn quoted_fields_keep_commas_quotes_and_line_breaks() {
        let parsed = parse_ok(
            "wa_id,name,attr.note\n\
             4915123456789,\"Lovelace, Ada\",\"said \"\"hi\"\"\nand left\"\n\
             4915123456780,Bob,\n",
        );
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        assert_eq!(parsed.rows[0].name.as_deref(), Some("Lovelace, Ada"));
        assert_eq!(parsed.rows[0].attrs["note"], "said \"hi\"\nand left");
        assert_eq!(parsed.rows[1].line, 4, "the quoted line break counts");
    }

    #[test]
    fn bom_crlf_and_blank_lines() {
        let parsed = parse_ok(
            "\u{feff}wa_id,name\r\n\r\n4915123456789,Ada\r\n,\r\n\r\n4915123456780,Bob\r\n",
        );
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let rows: Vec<(u64, &str)> = parsed
            .rows
            .iter()
            .map(|r| (r.line, r.name.as_deref().unwrap()))
            .collect();
        assert_eq!(rows, [(3, "Ada"), (6, "Bob")]);
        // Old Mac line ends: a lone CR ends a line too.
        let parsed = parse_ok("wa_id\r4915123456789\r\r4915123456780\r");
        let lines: Vec<u64> = parsed.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 4]);
    }

    #[test]
    fn a_field_that_is_not_utf8_skips_its_line() {
        let parsed = parse(b"wa_id,name\n4915123456789,Ada\n4915123456780,B\xffb\n").unwrap();
        assert_eq!(parsed.rows.len(), 1);
        assert_eq!(reasons(&parsed)[0].0, 3);
        assert!(reasons(&parsed)[0].1.contains("field 2 is not UTF-8"));
    }

    #[test]
    fn the_header_decides_for_the_whole_file() {
        assert_eq!(parse(b"").unwrap_err(), FileError::Empty);
        assert_eq!(
            parse(b"name,tags\nAda,vip\n").unwrap_err(),
            FileError::NoIdentifierColumn
        );
        let unknown = parse(b"wa_id,timezon\n").unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown column `timezon` (column 2 of the header): did you mean `timezone`?; \
             the columns are wa_id, bsuid, name, tags, timezone and attr.KEY"
        );
        assert!(
            parse(b"wa_id,attr.\n")
                .unwrap_err()
                .to_string()
                .contains("needs a key")
        );
        assert_eq!(
            parse(b"wa_id,name,wa_id\n").unwrap_err(),
            FileError::DuplicateColumn {
                column: "wa_id".into(),
                first: 1,
                second: 3
            }
        );
        // A header alone is a file with nothing to import, not an error.
        let parsed = parse_ok("wa_id\n");
        assert!(parsed.rows.is_empty() && parsed.skipped.is_empty());
    }
}
