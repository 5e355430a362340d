//! Column-aligned plain-text tables, as kubectl prints them.

/// Renders `header` and `rows` left-aligned, columns separated by three spaces, no trailing
/// blanks. Rows shorter than the header are padded with empty cells.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            if i > 0 {
                l.push_str("   ");
            }
            l.push_str(cell);
            if i + 1 < cols {
                l.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        let mut cells = row
            .iter()
            .map(String::as_str)
            .chain(std::iter::repeat(""))
            .take(cols);
        line(&mut cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let out = render(
            &["NAME", "ROLE"],
            &[
                vec!["paris".into(), "primary".into()],
                vec!["ny".into(), "secondary".into()],
                vec!["short".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME    ROLE\nparis   primary\nny      secondary\nshort\n"
        );
    }
}
