// Members and roles (owners only): add by email or OIDC subject, change a
// role, remove. The API refuses to leave an org without an owner.

import { path } from "../api.js";
import { add, fmtTime, h, orDash, replace } from "../dom.js";
import { button, confirm, errorBox, field, form, notice, section, table } from "../ui.js";

export const title = "Members";

const ROLES = [
  ["member", "member (read only)"],
  ["admin", "admin (all but members and deletion)"],
  ["owner", "owner (everything)"],
];

export async function render(ctx) {
  const { org, api } = ctx;
  const list = h("div");
  const status = h("div", { "aria-live": "polite" });

  function roleControl(m) {
    const select = h(
      "select",
      { "aria-label": `Role of ${m.email || m.subject}`, class: "role" },
      ROLES.map(([v]) => h("option", { value: v, selected: v === m.role }, v)),
    );
    select.addEventListener("change", async () => {
      try {
        await api.post(path`/admin/orgs/${org.id}/members`, { user_id: m.user_id, role: select.value });
        replace(status, notice(`${m.email || m.subject} is now ${select.value}.`));
      } catch (e) {
        select.value = m.role;
        replace(status, errorBox(e));
      }
      reload();
    });
    return select;
  }

  async function remove(m) {
    const who = m.email || m.subject;
    const yes = await confirm({
      title: `Remove ${who}?`,
      message: `${who} loses access to ${org.name} at once.`,
      action: "Remove",
      danger: true,
    });
    if (!yes) return;
    try {
      await api.del(path`/admin/orgs/${org.id}/members/${m.user_id}`);
      replace(status, notice(`Removed ${who}.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    reload();
  }

  const reload = () =>
    section(
      list,
      () => api.get(path`/admin/orgs/${org.id}/members`),
      (doc) =>
        table({
          caption: "Members",
          rows: doc.items,
          columns: [
            { label: "Email", value: (m) => orDash(m.email) },
            { label: "Subject", value: (m) => h("code", {}, m.subject) },
            { label: "Role", value: roleControl },
            { label: "Since (UTC)", value: (m) => fmtTime(m.created_at) },
            { label: "Actions", value: (m) => button("Remove", () => remove(m), { kind: "danger small" }) },
          ],
        }),
    );

  add(ctx.main, 
    h("h1", {}, "Members"),
    status,
    list,
    h(
      "section",
      { class: "card", "aria-labelledby": "add-member" },
      h("h2", { id: "add-member" }, "Add a member"),
      form({
        label: "Add a member",
        submit: "Add",
        controls: [
          field({
            label: "Identify by",
            name: "by",
            kind: "select",
            options: [
              ["email", "email (of someone who has signed in)"],
              ["subject", "OIDC subject (works before their first sign-in)"],
            ],
          }),
          field({ label: "Email or subject", name: "who", required: true, maxlength: 320, autocomplete: "off" }),
          field({ label: "Role", name: "role", kind: "select", options: ROLES }),
        ],
        onSubmit: async ({ by, who, role }, el) => {
          const member = await api.post(path`/admin/orgs/${org.id}/members`, { [by]: who.trim(), role });
          el.elements.who.value = "";
          reload();
          return notice(`${member.email || member.subject} is ${member.role}.`);
        },
      }),
    ),
  );
  await reload();
}
