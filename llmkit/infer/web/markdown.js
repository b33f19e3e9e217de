// A small, safe Markdown renderer for model replies (llmkit chat page).
// Safety first: the whole text is HTML-escaped BEFORE any markup is added, and the only markup added
// is a fixed set of tags; links are kept only for http(s) URLs. So model output can never inject HTML.
// Covers: fenced code blocks (```lang), inline code, **bold**, *italic*, # headings, - / 1. lists,
// > quotes, [text](https://...) links, paragraphs. Not covered: tables, nested lists, images, HTML.
"use strict";

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(escaped) {
  // code spans first, parked as placeholders so that their contents get no further markup
  const spans = [];
  let s = escaped.replace(/`([^`\n]+)`/g, (_, c) => { spans.push("<code>" + c + "</code>"); return "\u0000" + (spans.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[+i]);
}

function renderMarkdown(text) {
  const out = [];
  const parts = text.split(/^```/m);  // even parts: prose; odd parts: code (an unclosed fence streams as code)
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      const lang = nl < 0 ? part.trim() : part.slice(0, nl).trim();
      const code = nl < 0 ? "" : part.slice(nl + 1);
      const cls = /^[\w+-]+$/.test(lang) ? ' class="lang-' + lang + '"' : "";
      out.push("<pre><code" + cls + ">" + escapeHtml(code.replace(/\n$/, "")) + "</code></pre>");
    } else {
      out.push(renderBlocks(part));
    }
  });
  return out.join("");
}

function renderBlocks(prose) {
  const html = [];
  let list = null, para = [];
  const flushPara = () => { if (para.length) { html.push("<p>" + para.map(renderInline).join("<br>") + "</p>"); para = []; } };
  const flushList = () => { if (list) { html.push("<" + list.tag + ">" + list.items.map(x => "<li>" + renderInline(x) + "</li>").join("") + "</" + list.tag + ">"); list = null; } };
  for (const raw of prose.split("\n")) {
    const line = escapeHtml(raw);
    let m;
    if (!raw.trim()) { flushPara(); flushList(); continue; }
    if ((m = raw.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara(); flushList();
      const n = m[1].length;
      html.push("<h" + n + ">" + renderInline(escapeHtml(m[2])) + "</h" + n + ">");
    } else if ((m = raw.match(/^\s*([-*+]|\d+\.)\s+(.*)$/))) {
      flushPara();
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
      list.items.push(escapeHtml(m[2]));
    } else if (raw.startsWith(">")) {
      flushPara(); flushList();
      html.push("<blockquote>" + renderInline(escapeHtml(raw.replace(/^>\s?/, ""))) + "</blockquote>");
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return html.join("");
}

if (typeof module !== "undefined") module.exports = { renderMarkdown, escapeHtml };
