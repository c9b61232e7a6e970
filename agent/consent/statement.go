package consent

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"strings"
)

// StatementVersion is the version of the Security Network Statement this
// agent ships. Bump it whenever the collected fields change: a participant
// who accepted an older version is paused until they accept this one.
//
// The version belongs to the content, not to a language: every
// translation (statement.LANG.md beside statement.md) says which English
// text it translates by that file's SHA-256, and a test fails when the
// English changed and a translation was not brought up to date.
const StatementVersion = 1

// statementFiles holds the statement (statement.md, English) and its
// translations (statement.de.md, …). Each starts with a front matter
// block between "---" lines: the summary the tray shows in its question,
// and, in translations, "source:" with the SHA-256 of the statement.md it
// translates.
//
//go:embed statement*.md
var statementFiles embed.FS

// Translated is the statement in one language.
type Translated struct {
	// Lang is the language's BCP 47 tag: "en", "de", "ru".
	Lang    string
	Title   string
	Summary string
	// Text is the whole statement, Markdown, its title included.
	Text string
	// Source is, for a translation, the SHA-256 of the English file it
	// translates.
	Source string
}

// statements maps each language to its statement, read once.
var statements = func() map[string]Translated {
	out := map[string]Translated{}
	entries, err := statementFiles.ReadDir(".")
	if err != nil {
		panic(err)
	}
	for _, e := range entries {
		lang := "en"
		if mid := strings.TrimSuffix(strings.TrimPrefix(e.Name(), "statement."), ".md"); mid != "md" && mid != e.Name() {
			lang = mid
		}
		b, err := statementFiles.ReadFile(e.Name())
		if err != nil {
			panic(err)
		}
		t, err := parseStatement(string(b))
		if err != nil {
			panic(fmt.Sprintf("consent: %s: %v", e.Name(), err))
		}
		t.Lang = lang
		out[lang] = t
	}
	return out
}()

// englishSource is the SHA-256 of statement.md, which translations name.
var englishSource = func() string {
	b, err := statementFiles.ReadFile("statement.md")
	if err != nil {
		panic(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}()

func parseStatement(s string) (Translated, error) {
	var t Translated
	rest, ok := strings.CutPrefix(s, "---\n")
	if !ok {
		return t, fmt.Errorf("no front matter (a block between --- lines)")
	}
	front, body, ok := strings.Cut(rest, "\n---\n")
	if !ok {
		return t, fmt.Errorf("front matter not closed with ---")
	}
	for _, line := range strings.Split(front, "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch strings.TrimSpace(k) {
		case "summary":
			t.Summary = strings.TrimSpace(v)
		case "source":
			t.Source = strings.TrimSpace(v)
		}
	}
	t.Text = body
	title, _, _ := strings.Cut(body, "\n")
	t.Title, ok = strings.CutPrefix(title, "# ")
	if !ok || t.Summary == "" {
		return t, fmt.Errorf("needs a summary and a first line with the title (# …)")
	}
	return t, nil
}

// StatementTitle is the statement's title as shown to a person, in
// English.
var StatementTitle = statements["en"].Title

// StatementSummary is the short form the tray shows in a confirmation, in
// English.
var StatementSummary = statements["en"].Summary

// Statement returns the full text of the Security Network Statement, in
// English.
func Statement() string { return statements["en"].Text }

// StatementIn returns the statement in the language lang (a BCP 47 tag,
// "de" or "de-AT"), or in English when there is no translation.
func StatementIn(lang string) Translated {
	base, _, _ := strings.Cut(strings.ToLower(strings.ReplaceAll(lang, "_", "-")), "-")
	if t, ok := statements[base]; ok {
		return t
	}
	return statements["en"]
}

// StatementLanguages lists the languages the statement is written in.
func StatementLanguages() []string {
	var out []string
	for l := range statements {
		out = append(out, l)
	}
	return out
}

// StatementMentions reports whether the statement names a collected field
// (written as `field` in its table).
func StatementMentions(field string) bool {
	return strings.Contains(Statement(), "`"+field+"`")
}
