// Package i18n translates what cloudprotect says to a person: the command
// line's messages, the tray's menu and tooltip, and desktop notifications.
// It speaks English, German and Russian, chosen from the environment as
// gettext does (LANGUAGE, then LC_ALL, LC_MESSAGES, LANG), and formats
// numbers the way each language writes them. It is built on
// golang.org/x/text/message catalogs.
//
// The Security Network Statement is not translated here: its translations
// lie beside agent/consent/statement.md and carry the same version.
//
// # Adding a string
//
// Every message is a Key: its English text, with fmt verbs for what
// varies. Write it where it is used and print it through a Printer:
//
//	p := i18n.FromEnv(os.Getenv)
//	p.Fprintf(w, "%d records sent.\n", n)
//
// or, for a label kept in a constant, declare the constant as a Key:
//
//	const LabelQuit i18n.Key = "Quit"
//	item.SetTitle(p.Sprintf(LabelQuit))
//
// then add the translation of the exact same text to de.go and ru.go.
// Where the words depend on a number ("1 record", "2 records"; Russian has
// three forms), add a Forms entry instead of a plain string, and to en.go
// for English too. TestCatalogsComplete finds every Key in the module (each
// constant of type Key and each literal passed as one) and fails when a
// language lacks it, when a translation uses other arguments than the
// English text, or when a catalog holds a message nobody uses any more.
//
// A Key must be a constant: converting a computed string to Key hides it
// from the test, which fails on such a conversion. Log messages stay in
// English and do not go through a Printer; so do texts that programs read
// (JSON, file names).
package i18n

import (
	"io"
	"strings"

	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

// Key is a message: its English text, used to look up its translation.
type Key string

// Languages are the languages cloudprotect speaks; the first is the
// default.
var Languages = []language.Tag{language.English, language.German, language.Russian}

// Printer formats messages in one language.
type Printer struct {
	tag language.Tag
	p   *message.Printer
}

// New returns a Printer for tag, or for the closest language cloudprotect
// speaks (English if none is close).
func New(tag language.Tag) *Printer {
	t, ok := match(tag)
	if !ok {
		t = language.English
	}
	return &Printer{tag: t, p: message.NewPrinter(t, message.Catalog(cat))}
}

// English is the Printer for English; tests and programs that have no
// person to talk to use it.
func English() *Printer { return New(language.English) }

// FromEnv returns the Printer for the language the environment asks for;
// getenv is os.Getenv or a test's map.
func FromEnv(getenv func(string) string) *Printer { return New(Choose(getenv)) }

// Lang is the printer's language as a BCP 47 tag ("en", "de", "ru").
func (p *Printer) Lang() string { return p.tag.String() }

// Tag is the printer's language.
func (p *Printer) Tag() language.Tag { return p.tag }

// Sprintf translates key and formats it with args as fmt.Sprintf does,
// writing numbers as the language does.
func (p *Printer) Sprintf(key Key, args ...any) string {
	return p.p.Sprintf(string(key), args...)
}

// Fprintf is Sprintf written to w.
func (p *Printer) Fprintf(w io.Writer, key Key, args ...any) (int, error) {
	return p.p.Fprintf(w, string(key), args...)
}

// Error returns an error whose text is key translated and formatted.
// To keep a cause for errors.Is and errors.As, use Wrap.
func (p *Printer) Error(key Key, args ...any) error {
	return &Error{msg: p.Sprintf(key, args...)}
}

// Wrap returns an error whose text is key translated and formatted, and
// which unwraps to cause (whose own text is not shown).
func (p *Printer) Wrap(cause error, key Key, args ...any) error {
	return &Error{msg: p.Sprintf(key, args...), cause: cause}
}

// Error is a translated error message.
type Error struct {
	msg   string
	cause error
}

func (e *Error) Error() string { return e.msg }
func (e *Error) Unwrap() error { return e.cause }

// Choose picks the language from the environment as gettext does: the
// locale is the first of LC_ALL, LC_MESSAGES and LANG that is set; when it
// is "C" or "POSIX" the messages are English; otherwise the first language
// of the colon-separated LANGUAGE list that cloudprotect speaks, then the
// locale's own. A LANGUAGE with no locale set at all is honoured too.
func Choose(getenv func(string) string) language.Tag {
	locale := ""
	for _, v := range []string{"LC_ALL", "LC_MESSAGES", "LANG"} {
		if locale = getenv(v); locale != "" {
			break
		}
	}
	if isC(locale) {
		return language.English
	}
	wanted := strings.Split(getenv("LANGUAGE"), ":")
	wanted = append(wanted, locale)
	for _, w := range wanted {
		tag, ok := parseLocale(w)
		if !ok {
			continue
		}
		if t, ok := match(tag); ok {
			return t
		}
	}
	return language.English
}

func isC(locale string) bool {
	base, _, _ := strings.Cut(locale, ".")
	return base == "C" || base == "POSIX"
}

// parseLocale reads a POSIX locale name (de_AT.UTF-8@euro) or a BCP 47 tag.
func parseLocale(s string) (language.Tag, bool) {
	s, _, _ = strings.Cut(s, "@")
	s, _, _ = strings.Cut(s, ".")
	if s == "" || isC(s) {
		return language.Und, false
	}
	tag, err := language.Parse(strings.ReplaceAll(s, "_", "-"))
	if err != nil {
		return language.Und, false
	}
	return tag, true
}

var matcher = language.NewMatcher(Languages)

// match returns the language cloudprotect speaks that is tag, or a
// regional or script variant of it.
func match(tag language.Tag) (language.Tag, bool) {
	_, i, conf := matcher.Match(tag)
	if conf < language.High {
		return language.Und, false
	}
	return Languages[i], true
}
