package i18n

import (
	"fmt"
	"go/ast"
	"go/constant"
	"go/types"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"golang.org/x/text/language"
	"golang.org/x/tools/go/packages"
)

const (
	module  = "github.com/cloudprotect/cloudprotect"
	keyPkg  = module + "/tray/i18n"
	keyName = "Key"
)

// use is a Key found in the module's code.
type use struct {
	key string
	pos string
}

// moduleKeys loads every package of the module that imports this one, with
// types, and returns the constant Keys it uses and the places where a
// computed string is turned into a Key.
func moduleKeys(t *testing.T) (uses []use, computed []string) {
	t.Helper()
	cfg := &packages.Config{Mode: packages.NeedName | packages.NeedImports | packages.NeedFiles, Dir: "../.."}
	all, err := packages.Load(cfg, module+"/...")
	if err != nil {
		t.Fatalf("list the module's packages: %v", err)
	}
	users := []string{keyPkg}
	for _, p := range all {
		// Reading what go list read lets go test's cache see a change
		// to any of it.
		touch(p.GoFiles)
		if _, ok := p.Imports[keyPkg]; ok {
			users = append(users, p.PkgPath)
		}
	}
	if len(users) == 0 {
		return nil, nil
	}
	cfg.Mode = packages.NeedName | packages.NeedSyntax | packages.NeedTypes | packages.NeedTypesInfo | packages.NeedFiles
	pkgs, err := packages.Load(cfg, users...)
	if err != nil {
		t.Fatalf("load %v: %v", users, err)
	}
	for _, p := range pkgs {
		touch(p.GoFiles)
		for _, e := range p.Errors {
			t.Errorf("%s: %v", p.PkgPath, e)
		}
		for expr, tv := range p.TypesInfo.Types {
			if !isKey(tv.Type) || tv.Value == nil || tv.Value.Kind() != constant.String {
				continue
			}
			pos := p.Fset.Position(expr.Pos())
			if p.PkgPath == keyPkg && isCatalogFile(pos.Filename) {
				continue // the translations themselves
			}
			uses = append(uses, use{constant.StringVal(tv.Value), pos.String()})
		}
		for _, f := range p.Syntax {
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok || len(call.Args) != 1 {
					return true
				}
				fun, ok := p.TypesInfo.Types[call.Fun]
				if !ok || !fun.IsType() || !isKey(fun.Type) {
					return true
				}
				if arg := p.TypesInfo.Types[call.Args[0]]; arg.Value == nil {
					computed = append(computed, p.Fset.Position(call.Pos()).String())
				}
				return true
			})
		}
	}
	return uses, computed
}

// isCatalogFile reports whether a file of this package is a catalog
// (en.go, de.go, …), whose keys are not uses.
func isCatalogFile(name string) bool {
	for tag := range catalogs {
		if filepath.Base(name) == tag.String()+".go" {
			return true
		}
	}
	return false
}

// hasWords reports whether a message has words besides its verbs.
func hasWords(key string) bool {
	for _, w := range strings.Fields(verbRE.ReplaceAllString(key, " ")) {
		for _, r := range w {
			if unicode.IsLetter(r) {
				return true
			}
		}
	}
	return false
}

var verbRE = regexp.MustCompile(`%[-+# 0]*(\[\d+\])?[\d.*]*[a-zA-Z%]`)

func touch(files []string) {
	dirs := map[string]bool{}
	for _, f := range files {
		os.ReadFile(f)
		dirs[filepath.Dir(f)] = true
	}
	for d := range dirs {
		os.ReadDir(d)
	}
}

func isKey(t types.Type) bool {
	n, ok := t.(*types.Named)
	return ok && n.Obj().Pkg() != nil && n.Obj().Pkg().Path() == keyPkg && n.Obj().Name() == keyName
}

// TestCatalogsComplete fails when a message the code uses lacks a
// translation, when a translation uses other arguments than the English
// text, or when a catalog keeps a message nobody uses.
func TestCatalogsComplete(t *testing.T) {
	uses, computed := moduleKeys(t)
	for _, pos := range computed {
		t.Errorf("%s: a computed string is converted to i18n.Key: its translations cannot be checked; use a constant", pos)
	}
	used := map[string]string{} // key → first place it is used
	for _, u := range uses {
		if !hasWords(u.key) {
			continue // only verbs and punctuation: nothing to translate
		}
		if prev, ok := used[u.key]; !ok || u.pos < prev {
			used[u.key] = u.pos
		}
	}
	t.Logf("%d messages in use", len(used))
	for _, tag := range Languages {
		c := catalogs[tag]
		if tag == language.English {
			for k := range c.Messages {
				t.Errorf("en: %q: English messages are their own keys; only plural forms belong in en.go", k)
			}
		}
		for _, k := range slices.Sorted(maps.Keys(used)) {
			_, plain := c.Messages[Key(k)]
			_, forms := c.Plurals[Key(k)]
			switch {
			case plain && forms:
				t.Errorf("%s: %q is both a message and plural forms", tag, k)
			case !plain && !forms && tag != language.English:
				t.Errorf("%s: no translation of %q (used at %s): add it to %s.go", tag, k, used[k], tag)
			}
		}
		for k := range c.Messages {
			if _, ok := used[string(k)]; !ok {
				t.Errorf("%s: %q is translated but no code uses it: remove it from %s.go", tag, k, tag)
			}
		}
		for k := range c.Plurals {
			if _, ok := used[string(k)]; !ok {
				t.Errorf("%s: %q is translated but no code uses it: remove it from %s.go", tag, k, tag)
			}
		}
	}
}

// TestTranslationsKeepArguments: a translation formats the same arguments
// with the same verbs as its English text; a plural form may leave out the
// number it depends on.
func TestTranslationsKeepArguments(t *testing.T) {
	for _, tag := range Languages {
		c := catalogs[tag]
		for k, s := range c.Messages {
			checkArgs(t, tag, k, s, 0)
		}
		for k, f := range c.Plurals {
			want, err := verbs(string(k))
			if err != nil {
				t.Errorf("%s: %q: %v", tag, k, err)
				continue
			}
			if _, ok := want[f.Arg]; !ok {
				t.Errorf("%s: %q: plural forms depend on argument %d, which the message does not use", tag, k, f.Arg)
			}
			for _, s := range f.texts() {
				checkArgs(t, tag, k, s, f.Arg)
			}
			if tag == language.Russian && (f.One == "" || f.Few == "" || f.Many == "") {
				t.Errorf("ru: %q: Russian needs the One, Few and Many forms", k)
			}
			if tag != language.Russian && f.One == "" {
				t.Errorf("%s: %q: plural forms without One", tag, k)
			}
		}
	}
}

func checkArgs(t *testing.T, tag language.Tag, key Key, s string, optional int) {
	t.Helper()
	want, err := verbs(string(key))
	if err != nil {
		t.Errorf("%s: %q: %v", tag, key, err)
		return
	}
	got, err := verbs(s)
	if err != nil {
		t.Errorf("%s: translation %q of %q: %v", tag, s, key, err)
		return
	}
	if optional > 0 {
		if _, ok := got[optional]; !ok {
			delete(want, optional)
		}
	}
	if !maps.Equal(want, got) {
		t.Errorf("%s: translation %q of %q formats %s, want %s", tag, s, key, show(got), show(want))
	}
}

func show(v map[int]rune) string {
	var parts []string
	for _, i := range slices.Sorted(maps.Keys(v)) {
		parts = append(parts, fmt.Sprintf("%%[%d]%c", i, v[i]))
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, " ") + "}"
}

// verbs returns, for each argument a format string uses (from 1), its verb.
func verbs(format string) (map[int]rune, error) {
	out := map[int]rune{}
	arg := 1
	for i := 0; i < len(format); i++ {
		if format[i] != '%' {
			continue
		}
		i++
		if i < len(format) && format[i] == '%' {
			continue
		}
		for i < len(format) && strings.IndexByte("+-# 0", format[i]) >= 0 {
			i++
		}
		index := func() error {
			if i < len(format) && format[i] == '[' {
				end := strings.IndexByte(format[i:], ']')
				if end < 0 {
					return fmt.Errorf("unclosed argument index")
				}
				n, err := strconv.Atoi(format[i+1 : i+end])
				if err != nil {
					return fmt.Errorf("bad argument index %q", format[i:i+end+1])
				}
				arg = n
				i += end + 1
			}
			return nil
		}
		if err := index(); err != nil {
			return nil, err
		}
		for i < len(format) && (format[i] >= '0' && format[i] <= '9' || format[i] == '.' || format[i] == '*') {
			if format[i] == '*' {
				out[arg] = '*'
				arg++
			}
			i++
		}
		if err := index(); err != nil {
			return nil, err
		}
		if i >= len(format) {
			return nil, fmt.Errorf("format ends inside a verb")
		}
		if prev, ok := out[arg]; ok && prev != rune(format[i]) {
			return nil, fmt.Errorf("argument %d formatted as %%%c and %%%c", arg, prev, format[i])
		}
		out[arg] = rune(format[i])
		arg++
	}
	return out, nil
}

func TestVerbs(t *testing.T) {
	tests := []struct {
		in   string
		want map[int]rune
	}{
		{"no verbs, 100%% sure", map[int]rune{}},
		{"%d of %s", map[int]rune{1: 'd', 2: 's'}},
		{"%[2]s then %[1]d", map[int]rune{1: 'd', 2: 's'}},
		{"%-8s|%5.2f", map[int]rune{1: 's', 2: 'f'}},
		{"%q %v", map[int]rune{1: 'q', 2: 'v'}},
	}
	for _, tt := range tests {
		got, err := verbs(tt.in)
		if err != nil || !maps.Equal(got, tt.want) {
			t.Errorf("verbs(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
	if _, err := verbs("%[x]d"); err == nil {
		t.Error("a bad index was accepted")
	}
}
