//! Reading command lines: with rustyline (line editing, history, completion from the command table)
//! when standard input is a terminal, else line by line from standard input (scripts, tests). Lines are
//! bounded by [`MAX_LINE_BYTES`].

use std::io::{BufRead, Read};

use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

/// Longest command line, in bytes (longer ones are answered with an error and skipped).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most lines kept in the (in-memory) history.
const HISTORY_LINES: usize = 1_000;

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
}

impl Terminal {
    /// A line editor with completion and an in-memory history.
    pub fn new() -> rustyline::Result<Self> {
        let config = rustyline::Config::builder()
            .max_history_size(HISTORY_LINES)?
            .auto_add_history(true)
            .build();
        let mut editor = Editor::with_config(config)?;
        editor.set_helper(Some(CommandHelper));
        Ok(Terminal { editor })
    }
}

impl Input for Terminal {
    fn read(&mut self, prompt: &str) -> Line {
        match self.editor.readline(prompt) {
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
