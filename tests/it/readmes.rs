//! README.md and README.ru.md say the same things: the same sections, the same commands and
//! the same names (settings, paths, variables, values) in the same tables. A fact added to one
//! and not the other shows up here as a name only one of them has. README.md stays within
//! 20 KB.

/// Words a reader types that the Russian text rightly translates.
const TRANSLATED: [(&str, &str); 2] = [("NAME", "ИМЯ"), ("<SECTION>__<KEY>", "<РАЗДЕЛ>__<КЛЮЧ>")];

fn read(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    TRANSLATED
        .iter()
        .fold(text, |text, (en, ru)| text.replace(ru, en))
}

/// The fenced blocks, each with its `#` comments (the prose inside them) taken out.
fn code_blocks(text: &str) -> Vec<String> {
    let blocks = text.split("```").skip(1).step_by(2);
    blocks
        .map(|block| {
            let lines = block.lines().map(|line| match line.find(" #") {
                Some(at) => line[..at].trim_end(),
                None if line.trim_start().starts_with('#') => "",
                None => line,
            });
            lines.collect::<Vec<_>>().join("\n")
        })
        .collect()
}

/// The inline code spans outside fenced blocks, with a span's line break read as a space.
fn code_spans(text: &str) -> std::collections::BTreeSet<String> {
    let prose: String = text.split("```").step_by(2).collect();
    let spans = prose.split('`').skip(1).step_by(2);
    spans
        .map(|span| span.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn shape(text: &str) -> (usize, usize, usize) {
    let sections = text.lines().filter(|l| l.starts_with("## ")).count();
    let rows = text
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .count();
    let bullets = text.lines().filter(|l| l.starts_with("- ")).count();
    (sections, rows, bullets)
}

#[test]
fn both_readmes_carry_the_same_sections_commands_and_names() {
    let (en, ru) = (read("README.md"), read("README.ru.md"));
    assert_eq!(shape(&en), shape(&ru), "sections, table rows, bullets");
    let (en_blocks, ru_blocks) = (code_blocks(&en), code_blocks(&ru));
    assert_eq!(en_blocks.len(), ru_blocks.len());
    for (en_block, ru_block) in en_blocks.iter().zip(&ru_blocks) {
        assert_eq!(en_block, ru_block, "a command differs between the READMEs");
    }
    let (en_spans, ru_spans) = (code_spans(&en), code_spans(&ru));
    let only_en: Vec<_> = en_spans.difference(&ru_spans).collect();
    let only_ru: Vec<_> = ru_spans.difference(&en_spans).collect();
    assert!(
        only_en.is_empty() && only_ru.is_empty(),
        "only in README.md: {only_en:?}\nonly in README.ru.md: {only_ru:?}"
    );
}

#[test]
fn the_readme_stays_within_20_kb() {
    let size = std::fs::metadata("README.md").unwrap().len();
    assert!(size <= 20_000, "README.md is {size} bytes");
}
