//! `hamok`: a KV REPL over a local or broker cluster (`hamok repl`), and one peer with the HTTP gateway
//! (`hamok serve`).

fn main() {
    eprintln!("hamok: not yet implemented");
    std::process::exit(2);
}
