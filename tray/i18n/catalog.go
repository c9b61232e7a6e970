package i18n

import (
	"fmt"

	"golang.org/x/text/feature/plural"
	"golang.org/x/text/language"
	"golang.org/x/text/message/catalog"
)

// Forms is a message whose words depend on a number: Arg is the position
// (from 1) of that number among the arguments, and each form is the whole
// message for numbers of that plural category in the language (English
// and German use One and Other; Russian One, Few, Many and Other).
type Forms struct {
	Arg                   int
	One, Few, Many, Other string
}

// texts returns the forms that are set.
func (f Forms) texts() []string {
	var out []string
	for _, s := range []string{f.One, f.Few, f.Many, f.Other} {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

func (f Forms) message() catalog.Message {
	var cases []any
	for _, c := range []struct {
		form plural.Form
		text string
	}{{plural.One, f.One}, {plural.Few, f.Few}, {plural.Many, f.Many}, {plural.Other, f.Other}} {
		if c.text != "" {
			cases = append(cases, c.form, c.text)
		}
	}
	return plural.Selectf(f.Arg, "%d", cases...)
}

// Catalog is one language's translations: plain messages and those that
// depend on a number.
type Catalog struct {
	Messages map[Key]string
	Plurals  map[Key]Forms
}

// catalogs holds every language's translations (en.go, de.go, ru.go).
var catalogs = map[language.Tag]Catalog{
	language.English: en,
	language.German:  de,
	language.Russian: ru,
}

var cat = build()

func build() catalog.Catalog {
	b := catalog.NewBuilder(catalog.Fallback(language.English))
	for tag, c := range catalogs {
		for k, s := range c.Messages {
			if err := b.SetString(tag, string(k), s); err != nil {
				panic(fmt.Sprintf("i18n: %s %q: %v", tag, k, err))
			}
		}
		for k, f := range c.Plurals {
			if f.Other == "" || f.Arg < 1 {
				panic(fmt.Sprintf("i18n: %s %q: plural forms need Arg and Other", tag, k))
			}
			if err := b.Set(tag, string(k), f.message()); err != nil {
				panic(fmt.Sprintf("i18n: %s %q: %v", tag, k, err))
			}
		}
	}
	return b
}
