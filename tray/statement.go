package tray

import (
	"bytes"
	"html/template"
	"strings"

	"github.com/cloudprotect/cloudprotect/agent/api"
)

// StatementHTML renders the statement as a web page a browser shows, so
// that "Read the Security Network Statement" opens a readable document
// rather than Markdown source in a text editor. It understands what the
// statement uses: headings, paragraphs, tables and `code`; everything is
// escaped.
func StatementHTML(st api.Statement, version string) ([]byte, error) {
	var body []template.HTML
	lines := strings.Split(st.Text, "\n")
	for i := 0; i < len(lines); {
		line := strings.TrimSpace(lines[i])
		switch {
		case line == "":
			i++
		case strings.HasPrefix(line, "# "):
			body = append(body, tag("h1", line[2:]))
			i++
		case strings.HasPrefix(line, "## "):
			body = append(body, tag("h2", line[3:]))
			i++
		case strings.HasPrefix(line, "|"):
			var rows [][]string
			for ; i < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[i]), "|"); i++ {
				cells := strings.Split(strings.Trim(strings.TrimSpace(lines[i]), "|"), "|")
				if strings.Trim(strings.Join(cells, ""), "-: ") == "" {
					continue // the header's underline
				}
				rows = append(rows, cells)
			}
			body = append(body, table(rows))
		default:
			var para []string
			for ; i < len(lines) && strings.TrimSpace(lines[i]) != "" && !strings.HasPrefix(strings.TrimSpace(lines[i]), "#") &&
				!strings.HasPrefix(strings.TrimSpace(lines[i]), "|"); i++ {
				para = append(para, strings.TrimSpace(lines[i]))
			}
			body = append(body, tag("p", strings.Join(para, " ")))
		}
	}
	var out bytes.Buffer
	err := pageTmpl.Execute(&out, struct {
		Lang, Title, Version string
		Body                 []template.HTML
	}{st.Lang, st.Title, version, body})
	return out.Bytes(), err
}

// inline escapes s and turns `code` spans into <code>.
func inline(s string) string {
	parts := strings.Split(s, "`")
	var b strings.Builder
	for i, p := range parts {
		if i%2 == 1 && i < len(parts)-1 {
			b.WriteString("<code>" + template.HTMLEscapeString(p) + "</code>")
			continue
		}
		if i%2 == 1 {
			b.WriteString("`")
		}
		b.WriteString(template.HTMLEscapeString(p))
	}
	return b.String()
}

func tag(name, text string) template.HTML {
	return template.HTML("<" + name + ">" + inline(text) + "</" + name + ">")
}

func table(rows [][]string) template.HTML {
	var b strings.Builder
	b.WriteString("<table>")
	for r, row := range rows {
		cell := "td"
		if r == 0 {
			cell = "th"
		}
		b.WriteString("<tr>")
		for _, c := range row {
			b.WriteString("<" + cell + ">" + inline(strings.TrimSpace(c)) + "</" + cell + ">")
		}
		b.WriteString("</tr>")
	}
	b.WriteString("</table>")
	return template.HTML(b.String())
}

var pageTmpl = template.Must(template.New("statement").Parse(`<!DOCTYPE html>
<html lang="{{.Lang}}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Title}}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; line-height: 1.5; color: #1d2329; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
.version { color: #5b6571; margin-top: 0; }
h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; font-size: 0.95em; }
th, td { text-align: left; vertical-align: top; border-bottom: 1px solid #d5dae0; padding: 0.4em 0.6em 0.4em 0; }
code { font-family: ui-monospace, monospace; background: #f0f3f6; padding: 0 0.2em; border-radius: 3px; }
@media (prefers-color-scheme: dark) { body { color: #e6e9ec; background: #1d2329; } code { background: #2c343c; } th, td { border-color: #3d4650; } .version { color: #a5aeb8; } }
</style>
</head>
<body>
{{range $i, $b := .Body}}{{$b}}{{if eq $i 0}}
<p class="version">{{$.Version}}</p>{{end}}
{{end}}
</body>
</html>
`))
