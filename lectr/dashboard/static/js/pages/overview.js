// One organization: its status and kill switch, rename, delete (owners).

import { path } from "../api.js";
import { add, fmtTime, h, replace } from "../dom.js";
import { button, confirm, field, fields, form, notice, toggle } from "../ui.js";
import { setEnabled } from "./orgs.js";

export const title = "Overview";

export async function render(ctx) {
  const { org, access } = ctx;
  const status = h("div", { "aria-live": "polite" });
  const killSwitch = access.write
    ? toggle({
        label: `${org.name}: requests allowed`,
        checked: org.enabled,
        class: "switch kill-switch",
        onChange: async (enabled) => {
          if (await setEnabled(ctx, org, enabled, status)) {
            ctx.refresh(); // the header shows the status too
          }
        },
      })
    : h("span", {}, org.enabled ? "enabled" : "disabled");

  add(ctx.main, 
    h("h1", {}, org.name),
    status,
    fields([
      ["Organization id", h("code", {}, org.id)],
      ["Requests allowed (kill switch)", killSwitch],
      ["Your role", org.role || (ctx.me.is_admin ? "global admin" : "—")],
      ["Created", `${fmtTime(org.created_at)} UTC`],
      ["Updated", `${fmtTime(org.updated_at)} UTC`],
    ]),
  );

  if (access.write) {
    add(ctx.main, 
      h(
        "section",
        { class: "card", "aria-labelledby": "rename-org" },
        h("h2", { id: "rename-org" }, "Rename"),
        form({
          label: "Rename the organization",
          submit: "Rename",
          controls: [field({ label: "New name", name: "name", value: org.name, required: true, maxlength: 200 })],
          onSubmit: async ({ name }) => {
            await ctx.api.put(path`/admin/orgs/${org.id}`, { name: name.trim() });
            ctx.refresh();
          },
        }),
      ),
    );
  }
  if (access.owner) {
    const result = h("div", { "aria-live": "polite" });
    add(ctx.main, 
      h(
        "section",
        { class: "card danger-zone", "aria-labelledby": "delete-org" },
        h("h2", { id: "delete-org" }, "Delete"),
        h("p", {}, "Deletes the organization with its keys, provider keys, settings, members and request log."),
        button(
          `Delete ${org.name}`,
          async () => {
            const yes = await confirm({
              title: `Delete ${org.name}?`,
              message: "This cannot be undone. Every key stops working at once and the request log is deleted.",
              action: "Delete",
              danger: true,
            });
            if (!yes) return;
            try {
              await ctx.api.del(path`/admin/orgs/${org.id}`);
              ctx.navigate("/orgs");
            } catch (e) {
              replace(result, notice(e.message, "error"));
            }
          },
          { kind: "danger" },
        ),
        result,
      ),
    );
  }
}
