package i18n

import (
	"errors"
	"io/fs"
	"testing"

	"golang.org/x/text/language"
)

func TestChoose(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want language.Tag
	}{
		{"nothing set", nil, language.English},
		{"LANG", map[string]string{"LANG": "de_DE.UTF-8"}, language.German},
		{"LANG with modifier", map[string]string{"LANG": "de_AT.UTF-8@euro"}, language.German},
		{"LC_MESSAGES before LANG", map[string]string{"LANG": "de_DE.UTF-8", "LC_MESSAGES": "ru_RU.UTF-8"}, language.Russian},
		{"LC_ALL before LC_MESSAGES", map[string]string{"LC_ALL": "en_GB.UTF-8", "LC_MESSAGES": "ru_RU.UTF-8"}, language.English},
		{"LANGUAGE before the locale", map[string]string{"LANG": "de_DE.UTF-8", "LANGUAGE": "ru"}, language.Russian},
		{"LANGUAGE list: first one spoken", map[string]string{"LANG": "en_US.UTF-8", "LANGUAGE": "fr:pt_BR:de"}, language.German},
		{"LANGUAGE none spoken: the locale", map[string]string{"LANG": "ru_UA.UTF-8", "LANGUAGE": "fr"}, language.Russian},
		{"C locale ignores LANGUAGE", map[string]string{"LANG": "C", "LANGUAGE": "de"}, language.English},
		{"C.UTF-8 ignores LANGUAGE", map[string]string{"LC_ALL": "C.UTF-8", "LANGUAGE": "de", "LANG": "de_DE.UTF-8"}, language.English},
		{"POSIX", map[string]string{"LC_MESSAGES": "POSIX", "LANG": "ru_RU.UTF-8"}, language.English},
		{"LANGUAGE alone", map[string]string{"LANGUAGE": "de_CH"}, language.German},
		{"not spoken", map[string]string{"LANG": "fr_FR.UTF-8"}, language.English},
		{"garbage", map[string]string{"LANG": "???", "LANGUAGE": "::"}, language.English},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Choose(func(k string) string { return tt.env[k] })
			if got != tt.want {
				t.Errorf("Choose(%v) = %v, want %v", tt.env, got, tt.want)
			}
			if p := FromEnv(func(k string) string { return tt.env[k] }); p.Tag() != tt.want {
				t.Errorf("FromEnv(%v) speaks %v", tt.env, p.Tag())
			}
		})
	}
}

func TestNewFallsBackToEnglish(t *testing.T) {
	if got := New(language.French).Lang(); got != "en" {
		t.Errorf("French printer speaks %s", got)
	}
	if got := New(language.MustParse("ru-UA")).Lang(); got != "ru" {
		t.Errorf("ru-UA printer speaks %s", got)
	}
}

func TestNumbers(t *testing.T) {
	// Numbers are written as each language writes them.
	for _, tt := range []struct {
		tag  language.Tag
		want string
	}{
		{language.English, "12,345"},
		{language.German, "12.345"},
		{language.Russian, "12\u00a0345"},
	} {
		if got := New(tt.tag).Sprintf("%d", 12345); got != tt.want {
			t.Errorf("%v: %q, want %q", tt.tag, got, tt.want)
		}
	}
}

func TestErrors(t *testing.T) {
	p := English()
	err := p.Wrap(fs.ErrNotExist, "no such thing: %s", "x")
	if err.Error() != "no such thing: x" || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Wrap: %q, is ErrNotExist %v", err, errors.Is(err, fs.ErrNotExist))
	}
	if err := p.Error("plain"); err.Error() != "plain" || errors.Unwrap(err) != nil {
		t.Errorf("Error: %q", err)
	}
}

func TestPlurals(t *testing.T) {
	const key Key = "Removed cloudprotect from %s (%d files).\n"
	for _, tt := range []struct {
		tag  language.Tag
		n    int
		want string
	}{
		{language.English, 1, "Removed cloudprotect from /usr (1 file).\n"},
		{language.English, 2, "Removed cloudprotect from /usr (2 files).\n"},
		{language.German, 1, "cloudprotect aus /usr entfernt (1 Datei).\n"},
		{language.German, 12, "cloudprotect aus /usr entfernt (12 Dateien).\n"},
		{language.Russian, 1, "cloudprotect удалён из /usr (1 файл).\n"},
		{language.Russian, 3, "cloudprotect удалён из /usr (3 файла).\n"},
		{language.Russian, 5, "cloudprotect удалён из /usr (5 файлов).\n"},
		{language.Russian, 21, "cloudprotect удалён из /usr (21 файл).\n"},
		{language.Russian, 12, "cloudprotect удалён из /usr (12 файлов).\n"},
	} {
		if got := New(tt.tag).Sprintf(key, "/usr", tt.n); got != tt.want {
			t.Errorf("%v %d: %q, want %q", tt.tag, tt.n, got, tt.want)
		}
	}
}
