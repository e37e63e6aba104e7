//! Reading command lines: with rustyline (line editing, history, completion from the command table)
//! when standard input is a terminal, else line by line from standard input (scripts, tests). Lines are
//! bounded by [`MAX_LINE_BYTES`].
//!
//! A terminal's history is kept in a file across runs, like redis-cli's: [`history_file`] says which.
//! Each line is appended as it is entered (a killed REPL loses none; blank lines and lines over
//! [`HISTORY_LINE_MAX_BYTES`] are not kept), the file is cut to the newest [`HISTORY_LINES`], and
//! rustyline creates it readable by its owner only: values typed there (a `CONFIG SET` of a secret)
//! are in it.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

/// Longest command line, in bytes (longer ones are answered with an error and skipped).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most lines kept in the history (in memory and in its file).
const HISTORY_LINES: usize = 1_000;
/// Longest line kept in the history: with [`HISTORY_LINES`], bounds its file to 8 MiB (a command
/// line may be up to [`MAX_LINE_BYTES`], and a few such would make a history of gigabytes).
const HISTORY_LINE_MAX_BYTES: usize = 8 << 10;
/// Names the history file; set to the empty string, no history is kept on disk.
pub const HISTORY_FILE_ENV: &str = "HAMOK_HISTFILE";

/// Where a terminal's history is kept: `$HAMOK_HISTFILE` when set (no file when it is empty), else
/// `~/.hamok_history`; none without a home directory.
pub fn history_file() -> Option<PathBuf> {
    match std::env::var_os(HISTORY_FILE_ENV) {
        Some(path) if path.is_empty() => None,
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| Path::new(&home).join(".hamok_history")),
    }
}

/// One read.
pub enum Line {
    /// A line (without its end of line).
    Text(String),
    /// A line that cannot be run (too long, not UTF-8): the error to answer.
    Bad(String),
    /// End of input.
    Eof,
}

/// A source of lines.
pub trait Input {
    /// The next line, showing `prompt` when interactive.
    fn read(&mut self, prompt: &str) -> Line;
}

/// Standard input, not a terminal.
pub struct Piped {
    stdin: std::io::StdinLock<'static>,
}

impl Piped {
    /// Reads standard input.
    pub fn new() -> Self {
        Piped {
            stdin: std::io::stdin().lock(),
        }
    }

    /// Skips to the end of the current line.
    fn skip_line(&mut self) {
        let mut sink = Vec::new();
        loop {
            sink.clear();
            match (&mut self.stdin)
                .take(64 * 1024)
                .read_until(b'\n', &mut sink)
            {
                Ok(0) | Err(_) => return,
                Ok(_) if sink.ends_with(b"\n") => return,
                Ok(_) => {}
            }
        }
    }
}

impl Input for Piped {
    fn read(&mut self, _prompt: &str) -> Line {
        let mut buf = Vec::new();
        let limit = MAX_LINE_BYTES as u64 + 1;
        match (&mut self.stdin).take(limit).read_until(b'\n', &mut buf) {
            Ok(0) => return Line::Eof,
            Ok(_) => {}
            Err(e) => return Line::Bad(format!("cannot read standard input: {e}")),
        }
        if !buf.ends_with(b"\n") && buf.len() > MAX_LINE_BYTES {
            self.skip_line();
            return Line::Bad(format!("line longer than {MAX_LINE_BYTES} bytes"));
        }
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        match String::from_utf8(buf) {
            Ok(s) => Line::Text(s),
            Err(_) => Line::Bad("line is not UTF-8".into()),
        }
    }
}

/// Completes command names from the command table.
pub struct CommandHelper;

impl Completer for CommandHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let head = &line[..pos];
        let start = head.len() - head.trim_start().len();
        // Only the command name (one or two words) is completed.
        let candidates = crate::table::complete(head)
            .into_iter()
            .map(|c| format!("{c} "))
            .collect();
        Ok((start, candidates))
    }
}

impl Hinter for CommandHelper {
    type Hint = String;
}
impl Highlighter for CommandHelper {}
impl Validator for CommandHelper {}
impl Helper for CommandHelper {}

/// A terminal: rustyline.
pub struct Terminal {
    editor: Editor<CommandHelper, DefaultHistory>,
    /// The history file, while it can be written (the first failure is reported and ends its use).
    history: Option<PathBuf>,
}

impl Terminal {
    /// A line editor with completion and a history, loaded from `history` and appended to it (see
    /// the module docs). A history file that cannot be read is reported and left alone.
    pub fn new(history: Option<PathBuf>) -> rustyline::Result<Self> {
        let config = rustyline::Config::builder()
            .max_history_size(HISTORY_LINES)?
            .build();
        let mut editor = Editor::with_config(config)?;
        editor.set_helper(Some(CommandHelper));
        let mut terminal = Terminal { editor, history };
        terminal.load_history();
        Ok(terminal)
    }

    fn load_history(&mut self) {
        let Some(path) = &self.history else { return };
        match self.editor.load_history(path) {
            Ok(()) => {}
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                // Unreadable (not ours, not a history file): never overwritten.
                eprintln!(
                    "hamok: history file {} not used: {e} (set {HISTORY_FILE_ENV} to another file, or empty for none)",
                    path.display()
                );
                self.history = None;
            }
        }
    }

    /// Keeps an entered line in the history (and its file), unless it is blank or longer than
    /// [`HISTORY_LINE_MAX_BYTES`].
    fn remember(&mut self, line: &str) {
        if line.trim().is_empty() || line.len() > HISTORY_LINE_MAX_BYTES {
            return;
        }
        // Only an I/O error of rustyline's in-memory history: nothing to report.
        let _ = self.editor.add_history_entry(line);
        self.save_history();
    }

    /// Appends the lines entered since the last call to the history file.
    fn save_history(&mut self) {
        let Some(path) = &self.history else { return };
        if let Err(e) = self.editor.append_history(path) {
            eprintln!(
                "hamok: cannot write the history file {}: {e}; history is kept in memory only",
                path.display()
            );
            self.history = None;
        }
    }
}

impl Input for Terminal {
    fn read(&mut self, prompt: &str) -> Line {
        let read = self.editor.readline(prompt);
        if let Ok(line) = &read {
            self.remember(line);
        }
        match read {
            Ok(line) if line.len() > MAX_LINE_BYTES => {
                Line::Bad(format!("line longer than {MAX_LINE_BYTES} bytes"))
            }
            Ok(line) => Line::Text(line),
            // Ctrl-C drops the line being typed.
            Err(ReadlineError::Interrupted) => Line::Text(String::new()),
            Err(ReadlineError::Eof) => Line::Eof,
            Err(e) => {
                eprintln!("hamok: cannot read the terminal: {e}");
                Line::Eof
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines entered in one run are in the file and in the next run's history (not blank ones, nor
    /// ones over `HISTORY_LINE_MAX_BYTES`); what another run appended in between is kept too; the
    /// file never holds more than `HISTORY_LINES`.
    #[test]
    fn history_survives_a_restart_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        let entered = |t: &mut Terminal, line: &str| t.remember(line);
        let mut first = Terminal::new(Some(path.clone())).unwrap();
        entered(&mut first, "SET a 1");
        entered(&mut first, "   ");
        entered(
            &mut first,
            &format!("SET big {}", "v".repeat(HISTORY_LINE_MAX_BYTES)),
        );
        entered(&mut first, "GET a");
        let mut second = Terminal::new(Some(path.clone())).unwrap();
        let had: Vec<String> = second.editor.history().iter().cloned().collect();
        assert_eq!(had, ["SET a 1", "GET a"]);
        entered(&mut second, "DEL a");
        entered(&mut first, "HGET h f");
        let third = Terminal::new(Some(path.clone())).unwrap();
        let had: Vec<String> = third.editor.history().iter().cloned().collect();
        assert_eq!(had, ["SET a 1", "GET a", "DEL a", "HGET h f"]);
        let mut t = third;
        for i in 0..HISTORY_LINES + 10 {
            entered(&mut t, &format!("GET k{i}"));
        }
        let last = Terminal::new(Some(path.clone())).unwrap();
        let had: Vec<String> = last.editor.history().iter().cloned().collect();
        assert_eq!(had.len(), HISTORY_LINES);
        assert_eq!(had.last().unwrap(), &format!("GET k{}", HISTORY_LINES + 9));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "only its owner reads the history: {mode:o}"
            );
        }
    }

    /// A file that is not a history is reported and never written over.
    #[test]
    fn an_unreadable_history_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-history");
        std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).unwrap();
        let mut t = Terminal::new(Some(path.clone())).unwrap();
        t.remember("SET a 1");
        assert_eq!(std::fs::read(&path).unwrap(), [0xff, 0xfe, 0x00, 0x80]);
    }

    #[test]
    fn the_history_file_follows_the_environment() {
        // One test owns the variable (tests run in threads of one process).
        std::env::set_var(HISTORY_FILE_ENV, "");
        assert_eq!(history_file(), None);
        std::env::set_var(HISTORY_FILE_ENV, "/tmp/h");
        assert_eq!(history_file(), Some(PathBuf::from("/tmp/h")));
        std::env::remove_var(HISTORY_FILE_ENV);
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            assert_eq!(
                history_file(),
                Some(Path::new(&home).join(".hamok_history"))
            );
        }
    }
}
